"""Rules: a run's series in, findings out. One module per rule family.

- ``kinds``: what a finding is (typed kinds, and what its evidence was measured on);
- ``core``: the finding, the thresholds' shared checks and the numeric kernels every rule uses
  (step spacing, window sums that give the same floats whether a run is read at once or in parts);
- ``loss``: the training loss and the validation loss, each against the run's own best level.

The lr, d and restart rules still live in ``lrwatch.analysis`` (``_GroupRules``).
"""
