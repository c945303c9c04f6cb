"""The reader on good, growing, truncated, damaged, empty and foreign files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import event_file_of, records_of, write_scalars
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrwatch.events import decode
from lrwatch.loader import EventFile
from lrwatch.records import HEADER, data_crcs, find_records, masked_crc


def test_the_crc32c_function_loaded_without_its_package_init_is_the_packages_own():
    import os

    import crc32c

    from lrwatch.records import _crc

    for n in (0, 1, 7, 8, 63, 64, 1000, 70000):
        data = os.urandom(n)
        assert _crc(data) == crc32c.crc32c(data)


def test_masked_crc_matches_the_tfrecord_definition():
    # masked crc of the 8-byte length of the first record of every file: known from TensorFlow's writer
    data = event_file_of("prodigy_cosine_healthy").read_bytes()
    assert masked_crc(data[:8]) == int.from_bytes(data[8:12], "little")


def test_a_whole_file_reads_every_record_and_ends_at_its_end():
    data = event_file_of("dadapt_sgd_blowup").read_bytes()
    frames = find_records(data)
    assert frames.end == len(data) and frames.pending == 0 and frames.damage == []
    assert len(frames.starts) == 2401  # file_version + 600 steps x 4 scalars


def test_every_truncation_point_is_an_unfinished_record_not_damage():
    data = event_file_of("dadapt_sgd_blowup").read_bytes()[:3000]
    full = find_records(data)
    for cut in range(1, len(data)):
        frames = find_records(data[:cut])
        assert frames.damage == [], cut
        assert frames.end + frames.pending == cut
        assert np.array_equal(frames.starts, full.starts[: len(frames.starts)])


def test_a_file_read_while_it_grows_byte_by_byte_chunks_gives_the_same_points(tmp_path):
    src = event_file_of("prodigy_two_groups").read_bytes()
    grown = tmp_path / "events.out.tfevents.1.host.1.0"
    grown.write_bytes(b"")
    loader = EventFile(grown)
    steps, values = [], []
    for cut in list(range(0, len(src), 977)) + [len(src)]:
        grown.write_bytes(src[:cut])  # a writer appends; records are split across reads
        batch = loader.read_new()
        assert batch.damage == []
        steps.append(batch.scalars.steps)
        values.append(batch.scalars.values)
    whole = EventFile(event_file_of("prodigy_two_groups")).read_new().scalars
    assert np.array_equal(np.concatenate(steps), whole.steps)
    assert np.array_equal(np.concatenate(values), whole.values)
    assert loader.offset == len(src)


def test_a_flipped_data_byte_loses_only_that_record_and_says_where():
    data = bytearray(event_file_of("dadapt_sgd_blowup").read_bytes())
    good = find_records(bytes(data))
    victim = int(good.starts[100])
    data[victim + 3] ^= 0xFF
    frames = find_records(bytes(data))
    assert len(frames.starts) == len(good.starts) - 1
    assert [d.offset for d in frames.damage] == [victim - HEADER]
    assert "checksum" in frames.damage[0].message
    assert frames.end == len(data)


def test_a_flipped_length_byte_is_reported_and_reading_resumes_at_the_next_record():
    data = bytearray(event_file_of("dadapt_sgd_blowup").read_bytes())
    good = find_records(bytes(data))
    header = int(good.starts[50]) - HEADER
    data[header + 1] ^= 0x40  # the length now claims 16 KiB more; its checksum no longer matches
    frames = find_records(bytes(data))
    assert len(frames.starts) == len(good.starts) - 1
    assert frames.damage[0].offset == header and "length" in frames.damage[0].message
    assert frames.end == len(data)


def test_damage_offsets_are_file_offsets_when_reading_resumes_mid_file(tmp_path):
    src = bytearray(event_file_of("dadapt_sgd_blowup").read_bytes())
    good = find_records(bytes(src))
    split = int(good.starts[1000]) - HEADER
    victim = int(good.starts[1500])
    src[victim] ^= 0x01
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(src[:split])
    loader = EventFile(path)
    assert loader.read_new().damage == []
    path.write_bytes(src)
    batch = loader.read_new()
    assert [d.offset for d in batch.damage] == [victim - HEADER]


def test_an_empty_file_is_not_an_error(tmp_path):
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(b"")
    batch = EventFile(path).read_new()
    assert len(batch.scalars) == 0 and batch.damage == [] and batch.pending == 0


def test_a_foreign_file_is_damage_at_offset_zero_and_nothing_is_read(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a TensorBoard event file\n" * 20)
    batch = EventFile(path).read_new()
    assert len(batch.scalars) == 0
    assert batch.damage and batch.damage[0].offset == 0


def test_garbage_after_good_records_is_reported_once_and_later_records_are_read(tmp_path):
    src = event_file_of("dadapt_sgd_blowup").read_bytes()
    good = find_records(src)
    cut = int(good.starts[10]) - HEADER
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(src[:cut] + b"\xde\xad\xbe\xef" * 8)
    loader = EventFile(path)
    first = loader.read_new()
    assert len(first.damage) == 1 and first.damage[0].offset == cut
    path.write_bytes(src[:cut] + b"\xde\xad\xbe\xef" * 8 + src[cut:])
    second = loader.read_new()
    assert second.damage == []  # not reported again
    assert len(first.scalars) + len(second.scalars) == 2400


def test_a_replaced_file_is_read_again_from_the_start(tmp_path):
    src = event_file_of("dadapt_sgd_blowup").read_bytes()
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(src)
    loader = EventFile(path)
    loader.read_new()
    path.write_bytes(src[:5000])  # shrank: someone rewrote it
    batch = loader.read_new()
    assert batch.restarted and loader.offset <= 5000 and len(batch.scalars) > 0


@pytest.mark.parametrize("steps_after", [202, 400])  # longer by a flush (read by GrowingFile), by much (Reader)
def test_a_file_truncated_and_written_again_in_place_is_read_again_from_the_start(tmp_path, steps_after):
    """``--poll`` may see a file only after it was truncated and written again, longer than
    before, in place (same inode): the bytes before the last offset changed, so it is read
    from its start, and the first NaN is found where it is (step 50), not after the old offset."""
    old = write_scalars(tmp_path / "old", {"loss": [(s, 1.0) for s in range(1, 201)]}).read_bytes()
    new = write_scalars(tmp_path / "new", {"loss": [(s, float("nan") if s == 50 else 2.0)
                                                    for s in range(1, steps_after + 1)]}).read_bytes()
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(old)
    loader = EventFile(path)
    loader.read_new()
    with open(path, "r+b") as fh:  # the same file, truncated and written again, longer
        fh.truncate(0)
        fh.write(new)
    batch = loader.read_new()
    assert batch.restarted
    steps, values = batch.scalars.steps, batch.scalars.values
    assert int(steps[np.isnan(values)][0]) == 50 and len(steps) == steps_after


def test_a_watched_file_read_flush_by_flush_hands_replacements_and_cut_records_to_the_full_read(tmp_path):
    """A flush is read without a ``Reader`` (``GrowingFile.appended``) only while the file is the
    one read before and grew by whole records; a rename over it, a longer copy that still holds
    the bytes read (a sync tool's), and a record cut mid-write are the full read's to judge."""
    src = event_file_of("dadapt_sgd_blowup").read_bytes()
    cuts = find_records(src).starts.tolist()
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(src[: cuts[40] - HEADER])
    loader = EventFile(path)
    seen = loader.read_new().scalars.steps.tolist()
    with open(path, "ab") as fh:  # whole records, then half of one, then the rest
        fh.write(src[cuts[40] - HEADER : cuts[43] - HEADER + 7])
    batch = loader.read_new()
    assert batch.pending == 7 and not batch.restarted
    seen += batch.scalars.steps.tolist()
    with open(path, "ab") as fh:
        fh.write(src[cuts[43] - HEADER + 7 : cuts[50] - HEADER])
    seen += loader.read_new().scalars.steps.tolist()
    longer = tmp_path / "synced"  # a sync tool's longer copy, renamed over it: read on from the offset
    longer.write_bytes(src[: cuts[60] - HEADER])
    longer.replace(path)
    batch = loader.read_new()
    assert not batch.restarted
    seen += batch.scalars.steps.tolist()
    assert seen == EventFile(path).read_new().scalars.steps.tolist()
    other = tmp_path / "other"  # a different file of the same length and more: read from the start
    other.write_bytes(src[cuts[1] - HEADER : cuts[70] - HEADER])
    other.replace(path)
    batch = loader.read_new()
    assert batch.restarted
    assert batch.scalars.steps.tolist() == EventFile(path).read_new().scalars.steps.tolist()
    assert loader.read_new().points == []  # nothing new: nothing read, nothing lost
    longer.write_bytes(path.read_bytes() + src[cuts[70] - HEADER : cuts[75] - HEADER])
    longer.replace(path)
    batch = loader.read_new()
    assert not batch.restarted and len(batch.scalars) == 5


def _held_open(path: Path) -> bool:
    """Whether this process holds ``path`` open (a deleted file shows as "<path> (deleted)")."""
    import psutil

    return any(f.path.startswith(str(path)) for f in psutil.Process().open_files())


def _growing_copy(path: Path, records: int) -> tuple[bytes, list[int]]:
    """A fixture's first ``records`` records at ``path``: (the fixture's bytes, its record starts)."""
    src, cuts = records_of("dadapt_sgd_blowup")
    path.write_bytes(src[: cuts[records]])
    return src, cuts


@pytest.mark.skipif(os.name != "posix", reason="kept open on POSIX only (Windows would block renames)")
def test_a_file_being_written_is_held_open_between_reads_and_a_finished_one_or_a_dropped_reader_is_not(tmp_path):
    """A reader keeps open only a file that grew, closes it when it goes, and a pickled copy of
    it (a run sent to or from a worker process) opens its own rather than share a descriptor."""
    growing, finished = tmp_path / "events.out.tfevents.1.h.1.0", tmp_path / "events.out.tfevents.2.h.1.0"
    src, cuts = _growing_copy(growing, 40)
    _growing_copy(finished, 40)
    loaders = [EventFile(growing), EventFile(finished)]
    for loader in loaders:
        loader.read_new()
    with open(growing, "ab") as fh:
        fh.write(src[cuts[40] : cuts[44]])
    assert len(loaders[0].read_new().scalars) == 4 and loaders[1].read_new().points == []
    assert _held_open(growing) and not _held_open(finished)
    with open(growing, "ab") as fh:
        fh.write(src[cuts[44] : cuts[48]])
    assert loaders[0].read_new().scalars.steps.tolist() == EventFile(growing).read_new().scalars.steps[44 - 1 : 48 - 1].tolist()
    copy = pickle.loads(pickle.dumps(loaders[0]))  # (runs go to and from the audit's worker processes)
    del loaders  # the original goes, and closes its file: the copy opens its own
    assert not _held_open(growing)
    with open(growing, "ab") as fh:
        fh.write(src[cuts[48] : cuts[49]])
    assert len(copy.read_new().scalars) == 1 and _held_open(growing)
    del copy
    assert not _held_open(growing)


@pytest.mark.skipif(os.name != "posix", reason="kept open on POSIX only")
def test_a_file_held_open_is_let_go_when_deleted_or_when_its_path_names_another_file(tmp_path):
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    src, cuts = _growing_copy(path, 40)
    loader = EventFile(path)
    loader.read_new()
    with open(path, "ab") as fh:
        fh.write(src[cuts[40] : cuts[41]])
    loader.read_new()
    assert _held_open(path)
    path.rename(tmp_path / "kept.bak")  # renamed away (it keeps a name), and the path made again
    path.write_bytes(src[: cuts[2]] + src[cuts[30] : cuts[35]])
    loader.check_name()  # what a listing of the run does
    assert not _held_open(path)
    batch = loader.read_new()
    assert batch.restarted and batch.scalars.steps.tolist() == EventFile(path).read_new().scalars.steps.tolist()
    with open(path, "ab") as fh:
        fh.write(src[cuts[35] : cuts[36]])
    assert len(loader.read_new().scalars) == 1 and _held_open(path)
    path.unlink()  # deleted: its space is not held, and the read says so
    assert loader.read_new().error == "file disappeared" and not _held_open(path)


@pytest.mark.skipif(os.name != "posix", reason="kept open on POSIX only")
def test_files_past_the_open_file_allowance_are_read_the_same_without_being_held(tmp_path, monkeypatch):
    from lrwatch.sources import GrowingFile

    monkeypatch.setattr(GrowingFile, "most_kept", GrowingFile.kept + 1)
    paths = [tmp_path / f"events.out.tfevents.{i}.h.1.0" for i in (1, 2)]
    loaders, src, cuts = [], b"", []
    for path in paths:
        src, cuts = _growing_copy(path, 40)
        loaders.append(EventFile(path))
        loaders[-1].read_new()
    for end in (41, 42, 43):
        for path, loader in zip(paths, loaders):
            with open(path, "ab") as fh:
                fh.write(src[cuts[end - 1] : cuts[end]])
            assert len(loader.read_new().scalars) == 1
    assert [_held_open(p) for p in paths] == [True, False]


def test_nan_inf_and_negative_steps_survive_the_fast_decoder(tmp_path):
    path = write_scalars(tmp_path, {"lr/unet": [(1, 0.5), (2, float("nan")), (3, float("inf")), (-4, 0.0),
                                                (2**40, -1.5)]})
    s = EventFile(path).read_new().scalars
    assert s.steps.tolist() == [-4, 1, 2, 3, 2**40]
    v = s.values
    assert v[0] == 0.0 and v[1] == 0.5 and np.isnan(v[2]) and np.isinf(v[3]) and v[4] == -1.5


@pytest.mark.parametrize("name", ["prodigy_two_groups", "tf2_tensor_scalars", "prodigy_cosine_healthy"])
def test_fast_decoder_agrees_with_tensorboards_own_parser(name):
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    path = event_file_of(name)
    expected = []
    for raw in RawEventFileLoader(str(path)).Load():
        event = Event.FromString(raw)
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                expected.append((value.tag, event.step, value.simple_value))
            elif value.WhichOneof("value") == "tensor":
                import tensorboard.util.tensor_util as tu

                expected.append((value.tag, event.step, float(tu.make_ndarray(value.tensor))))
    s = EventFile(path).read_new().scalars
    got = [(s.tags[t], int(st), float(v)) for t, st, v in zip(s.tag_ids, s.steps, s.values)]
    assert got == expected


# --- damage recovery, fuzzed ---------------------------------------------------------------------

_RECORDS = None


def _sample_records() -> list[bytes]:
    """Real records of different sizes: torch scalars, file_version, TF2 tensor scalars, hparams."""
    global _RECORDS
    if _RECORDS is None:
        from framing_oracle import records_of

        _RECORDS = (records_of(event_file_of("tf2_tensor_scalars").read_bytes())[:25]
                    + records_of(event_file_of("prodigy_two_groups").read_bytes())[:35])
    return _RECORDS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n_mutations=st.integers(1, 4),
       cuts=st.lists(st.integers(0, 12000), max_size=6))
def test_damage_never_loses_an_intact_record_and_pieces_read_like_one_pass(seed, n_mutations, cuts):
    import random

    from framing_oracle import Mutated, read_in_pieces

    rng = random.Random(seed)
    file = Mutated(_sample_records())
    for _ in range(n_mutations):
        file.mutate(rng)
    data = bytes(file.data)
    whole = find_records(data)
    got = set(whole.starts.tolist())
    assert set(file.intact_starts()) <= got  # every untouched record is read
    for s, n in zip(whole.starts.tolist(), whole.lengths.tolist()):  # and nothing unchecked is
        assert masked_crc(data[s : s + n]) == int.from_bytes(data[s + n : s + n + 4], "little")
    starts, damage = read_in_pieces(data, cuts)
    assert starts == whole.starts.tolist()
    assert damage == [d.offset for d in whole.damage]


def _steps_of_a_trainer() -> list[bytes]:
    """A long stretch of one trainer's steps: the same tags in the same order, an epoch's loss
    between some steps, a step number that gains a digit (what ``_periodic`` predicts)."""
    from framing_oracle import records_of

    return records_of(event_file_of("prodigy_two_groups").read_bytes())[:1500]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n_mutations=st.integers(0, 4), window=st.sampled_from([64, 300, 4096, 1 << 20]),
       periodic=st.booleans())
def test_records_found_a_window_at_a_time_equal_the_record_by_record_walk(seed, n_mutations, window, periodic):
    """A finished file's records are found with numpy over a window of bytes, not a loop per
    record (a repeating pattern of lengths predicted, or every offset checked for a header);
    whatever the damage (flipped bits, inserted headers, absurd lengths, cut windows), the
    records and damage are exactly the plain walk's."""
    import random

    from framing_oracle import Mutated

    import lrwatch.records as records

    rng = random.Random(seed)
    file = Mutated(_steps_of_a_trainer() if periodic else _sample_records())
    for _ in range(n_mutations):
        file.mutate(rng)
    data = bytes(file.data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(records, "CHAIN_FROM", 0)
        mp.setattr(records, "RESYNC_WINDOW", window)
        mp.setattr(records, "SMALL_BUFFER", -1)
        chained = find_records(data, 7)
        mp.setattr(records, "_chain", lambda b, pos: None)
        mp.setattr(records, "_periodic", lambda b, pos: None)
        plain = find_records(data, 7)
    assert chained.starts.tolist() == plain.starts.tolist() and chained.lengths.tolist() == plain.lengths.tolist()
    assert (chained.end, chained.pending, chained.in_garbage, chained.need) == (plain.end, plain.pending,
                                                                                plain.in_garbage, plain.need)
    assert chained.damage == plain.damage


@pytest.mark.parametrize("seed", range(8))
def test_a_damaged_file_growing_on_disk_reads_like_one_pass_in_small_chunks(tmp_path, monkeypatch, seed):
    import random

    from framing_oracle import Mutated

    monkeypatch.setattr("lrwatch.loader.CHUNK_BYTES", 256)  # records larger than a chunk, too
    rng = random.Random(seed)
    file = Mutated(_sample_records())
    for _ in range(3):
        file.mutate(rng)
    data = bytes(file.data)
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(data)
    once = EventFile(path).read_new()
    path.write_bytes(b"")
    loader = EventFile(path)
    steps, damage = [], []
    with open(path, "ab") as fh:
        for cut in sorted(rng.sample(range(len(data)), 12)) + [len(data)]:
            fh.write(data[fh.tell() : cut])
            fh.flush()
            batch = loader.read_new()
            steps += batch.scalars.steps.tolist()
            damage += [d.offset for d in batch.damage]
    assert steps == once.scalars.steps.tolist()
    assert damage == [d.offset for d in once.damage]


def test_a_long_damaged_stretch_is_skipped_fast_in_bounded_memory(tmp_path):
    """64 MiB of zeros between two halves of a run: every record after them is read, quickly,
    without holding the file in memory (a fresh process measures its own peak)."""
    import subprocess
    import sys
    import textwrap

    src = event_file_of("dadapt_sgd_blowup").read_bytes()
    good = find_records(src)
    cut = int(good.starts[1200]) - HEADER
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    with open(path, "wb") as fh:
        fh.write(src[:cut])
        fh.write(bytes(64 << 20))
        fh.write(src[cut:])
    code = textwrap.dedent(f"""
        import resource, time
        from lrwatch.loader import EventFile
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        b = EventFile({str(path)!r}).read_new()
        print(len(b.scalars), len(b.damage), time.perf_counter() - t,
              (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    points, damaged, seconds, grew_mb = int(out[0]), int(out[1]), float(out[2]), float(out[3])
    assert points == 2400 and damaged == 1
    assert seconds < 10  # ~1 s here; was 40 s
    assert grew_mb < 120  # chunks of 16 MiB; was 705 MB


_SMALL_SOURCE = event_file_of("prodigy_seed_bump").read_bytes()
_BOUNDARIES = (find_records(_SMALL_SOURCE).starts - HEADER).tolist()


@settings(max_examples=300, deadline=None)
@given(first=st.integers(0, 200), size=st.integers(0, 4096), shift=st.sampled_from([0, 0, 0, 1, 5]),
       flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), max_size=2))
def test_a_small_read_walked_in_plain_python_frames_exactly_like_the_full_walk(first, size, shift, flips):
    """The watcher's small reads (a step or two) skip numpy; whatever the bytes (cut anywhere,
    bits flipped, not starting at a record), the result is the full walk's."""
    import lrwatch.records as records

    start = _BOUNDARIES[first] + shift
    data = bytearray(_SMALL_SOURCE[start : start + size])
    for at, bit in flips:
        if at < len(data):
            data[at] ^= bit
    small = find_records(bytes(data), 100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(records, "SMALL_BUFFER", -1)
        full = find_records(bytes(data), 100)
    assert small.starts.tolist() == full.starts.tolist() and small.lengths.tolist() == full.lengths.tolist()
    assert (small.end, small.pending, small.in_garbage, small.need) == (full.end, full.pending, full.in_garbage,
                                                                        full.need)
    assert small.damage == full.damage


@settings(max_examples=300, deadline=None)
@given(first=st.integers(0, 200), size=st.integers(0, 4096), shift=st.sampled_from([0, 0, 0, 1, 5]),
       flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), max_size=2))
def test_a_watched_flush_decoded_in_one_pass_reads_exactly_like_walking_then_decoding(first, size, shift, flips):
    """The watcher reads a flush of whole add_scalar records in one plain-Python pass; whatever
    the bytes (cut anywhere, bits flipped, not starting at a record, the file_version record
    or not), what is read is what the walk and the decoder give."""
    import tempfile

    import lrwatch.loader as loader

    start = _BOUNDARIES[first] + shift if first else 0
    data = bytearray(_SMALL_SOURCE[start : start + size])
    for at, bit in flips:
        if at < len(data):
            data[at] ^= bit
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.out.tfevents.1.h.1.0"
        path.write_bytes(bytes(data))
        fused = loader.EventFile(path)
        got = fused.read_new()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loader, "whole_torch_step", lambda buf: None)
            walked = loader.EventFile(path)
            want = walked.read_new()
    a, b = got.scalars, want.scalars  # (tags are numbered as met; numpy's decoder, from 64 records, may differ)
    assert [a.tags[i] for i in a.tag_ids] == [b.tags[i] for i in b.tag_ids] and a.steps.tolist() == b.steps.tolist()
    assert a.values.tobytes() == b.values.tobytes() and a.wall_times.tobytes() == b.wall_times.tobytes()
    assert (got.damage, got.pending, a.undecodable, a.hparams) == (want.damage, want.pending, b.undecodable, b.hparams)
    assert (fused.offset, fused.in_garbage, fused.records_read, fused._tail) == (
        walked.offset, walked.in_garbage, walked.records_read, walked._tail)


def test_a_trainers_flush_takes_the_one_pass_read():
    """Not a fallback that never runs: a step of torch's writer, and a file's first bytes with
    the file_version record, are read in one pass."""
    from lrwatch.loader import whole_torch_step

    step = _SMALL_SOURCE[_BOUNDARIES[100] : _BOUNDARIES[106]]
    points, count = whole_torch_step(step)
    assert count == 6 and len(points) == 6
    points, count = whole_torch_step(_SMALL_SOURCE[: _BOUNDARIES[4]])
    assert count == 4 and len(points) == 3  # the file_version record holds no point


# --- records decoded one by one in plain Python ---------------------------------------------------

def _proto_points(data: bytes, frames) -> list[tuple]:
    from tensorboard.compat.proto.event_pb2 import Event

    out = []
    for s, n in zip(frames.starts.tolist(), frames.lengths.tolist()):
        event = Event.FromString(data[s : s + n])
        out += [(v.tag, event.step, v.simple_value, event.wall_time) for v in event.summary.value]
    return out


@settings(max_examples=300, deadline=None)
@given(points=st.lists(st.tuples(st.text(min_size=0, max_size=140), st.integers(-2**63, 2**63 - 1),
                                 st.floats(width=32, allow_nan=False), st.floats(allow_nan=False)),
                       min_size=1, max_size=8),
       version=st.booleans(), vectorised=st.booleans())
def test_records_decoded_without_the_proto_equal_tensorboards_parser(points, version, vectorised):
    """torch's scalars skip the proto: a watched step's few records in plain Python, a file's
    many with numpy. Either way any tag (empty, long, non-ASCII), any int64 step (negative ones
    take ten bytes), any value and wall time read as the proto reads them, and a file_version
    record (with the writer's source_metadata) gives nothing."""
    import io

    from tensorboard.compat.proto.event_pb2 import Event, SourceMetadata
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    import lrwatch.events as events

    buf = io.BytesIO()
    writer = RecordWriter(buf)
    if version:
        writer.write(Event(wall_time=1.5, file_version="brain.Event:2",
                           source_metadata=SourceMetadata(writer="tensorboard.summary.writer")).SerializeToString())
    for tag, step, value, wall in points:
        writer.write(Event(wall_time=wall, step=step, summary=Summary(
            value=[Summary.Value(tag=tag, simple_value=value)])).SerializeToString())
    data = buf.getvalue()
    frames = find_records(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(events, "VECTORISE_FROM", 1 if vectorised else 64)
        s = decode(data, frames.starts, frames.lengths)
    got = [(s.tags[t], st_, v, w) for t, st_, v, w in zip(s.tag_ids.tolist(), s.steps.tolist(), s.values.tolist(),
                                                         s.wall_times.tolist())]
    assert got == _proto_points(data, frames)


def test_every_step_width_the_fast_decoder_takes_reads_as_the_proto_reads_it():
    """Steps of 1 to 7 varint bytes (below 2**49) are read from one word per record; each width's
    edges, step 0 (not written: the proto's path) and the first step that needs 8 bytes (the
    proto's path too) read as the proto reads them."""
    import io

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    from lrwatch.events import _fast_scalar_layout, _words

    steps = sorted({0, 1, 2**49} | {edge + d for k in range(1, 8) for edge in [2 ** (7 * k)] for d in (-1, 0)})
    buf = io.BytesIO()
    writer = RecordWriter(buf)
    for i, step in enumerate(steps * 10):  # enough records for the vectorised path
        writer.write(Event(wall_time=1e9 + i, step=step, summary=Summary(
            value=[Summary.Value(tag="lr/unet", simple_value=0.5)])).SerializeToString())
    data = buf.getvalue()
    frames = find_records(data)
    u8 = np.frombuffer(data, np.uint8)
    layout = _fast_scalar_layout(u8, _words(data, len(u8)), frames.starts, frames.lengths)
    assert layout.ok.tolist() == [0 < step < 2**49 for step in steps * 10]  # a step of 0 is not written at all
    decoded = decode(data, frames.starts, frames.lengths)
    assert decoded.steps.tolist() == steps * 10 == [p[1] for p in _proto_points(data, frames)]


def test_tensorflow_dtype_numbers_match_tensorboards_protos():
    from tensorboard.compat.proto import types_pb2

    import lrwatch.events as events

    for name in ("DT_FLOAT", "DT_DOUBLE", "DT_INT32", "DT_INT64", "DT_BFLOAT16", "DT_HALF"):
        assert getattr(events, name) == getattr(types_pb2, name), name


@settings(max_examples=200, deadline=None)
@given(template=st.binary(min_size=1, max_size=80), n=st.integers(1, 120), seed=st.integers(0, 2**32),
       varying=st.integers(0, 40), others=st.lists(st.binary(min_size=0, max_size=60), max_size=5))
def test_crcs_of_many_records_equal_one_crc32c_call_per_record(template, n, seed, varying, others):
    """Records of one length get their CRCs together (one crc32c call, then table look-ups for
    the bytes in which they differ); whatever the lengths, the number of differing bytes and the
    records of other lengths among them, each CRC is crc32c's own."""
    import random

    import crc32c

    rng = random.Random(seed)
    records = []
    for _ in range(n):
        rec = bytearray(template)
        for _ in range(varying):
            rec[rng.randrange(len(rec))] = rng.randrange(256)
        records.append(bytes(rec))
    records += others
    rng.shuffle(records)
    buf = bytearray(rng.randbytes(3))
    starts, lengths = [], []
    for rec in records:
        starts.append(len(buf))
        lengths.append(len(rec))
        buf += rec + rng.randbytes(rng.randrange(0, 9))
    u8 = np.frombuffer(bytes(buf), np.uint8)
    got = data_crcs(u8, np.asarray(starts, np.int64), np.asarray(lengths, np.int64))
    assert got.tolist() == [crc32c.crc32c(rec) for rec in records]


def test_a_tag_that_is_not_utf8_decodes_the_same_whole_and_record_by_record():
    """A watch reads a few records at a time (plain Python), an audit a whole file (numpy):
    a tag with a byte that is not UTF-8 gave a point in one and none in the other."""
    from lrwatch.records import HEADER, masked_crc

    src, cuts = records_of("prodigy_cosine_healthy")
    out = bytearray()
    for a, b in zip(cuts, [*cuts[1:], len(src)]):
        data = src[a + HEADER : b - 4].replace(b"lr/unet", b"lr/u\xffet")
        length = len(data).to_bytes(8, "little")
        out += length + masked_crc(length).to_bytes(4, "little") + data + masked_crc(data).to_bytes(4, "little")
    buf = bytes(out)
    frames = find_records(buf)
    assert frames.damage == [] and len(frames.starts) > 64  # the whole file is decoded vectorised
    whole = decode(buf, frames.starts, frames.lengths)
    one_by_one = [decode(buf, frames.starts[i : i + 1], frames.lengths[i : i + 1]) for i in range(len(frames.starts))]
    points = [(b.tags[t], s, v) for b in one_by_one for t, s, v in zip(b.tag_ids, b.steps, b.values)]
    assert points == [(whole.tags[t], s, v) for t, s, v in zip(whole.tag_ids, whole.steps, whole.values)]
    assert "lr/u\\xffet" in whole.tags and whole.undecodable == 0


def test_the_damage_offset_of_a_record_that_is_no_event_is_that_record_s_start(tmp_path):
    from lrwatch.records import masked_crc

    src, cuts = records_of("prodigy_cosine_healthy")
    data = b"\xff" * 9  # a valid frame around bytes that are not an Event proto
    length = len(data).to_bytes(8, "little")
    odd = length + masked_crc(length).to_bytes(4, "little") + data + masked_crc(data).to_bytes(4, "little")
    at = cuts[100]
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(src[:at] + odd + src[at:])
    (damage,) = EventFile(path).read_new().damage
    assert damage.offset == at and "not TensorBoard events" in damage.message


@pytest.mark.parametrize("seed", range(8))
def test_a_damaged_file_read_in_budgeted_parts_reads_like_one_pass(tmp_path, seed):
    """An audit reads a long run in parts (``read_new(budget=)``): whatever the damage, the
    parts together hold the one pass's points and damage, and only the last part says none
    is left."""
    import random

    from framing_oracle import Mutated

    rng = random.Random(seed)
    file = Mutated(_sample_records())
    for _ in range(3):
        file.mutate(rng)
    path = tmp_path / "events.out.tfevents.1.h.1.0"
    path.write_bytes(bytes(file.data))
    once = EventFile(path).read_new()
    for budget in (1, 97, 700):
        loader = EventFile(path)
        steps, damage = [], []
        while True:
            batch = loader.read_new(budget)
            steps += batch.scalars.steps.tolist()
            damage += [d.offset for d in batch.damage]
            if not batch.more:
                break
        assert steps == once.scalars.steps.tolist() and damage == [d.offset for d in once.damage], budget
        assert loader.read_new(budget).scalars.steps.tolist() == []  # (nothing twice)
