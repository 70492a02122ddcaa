"""Spot checks: a sample of the swarm's span computations re-run elsewhere and judged.

A client (or a training site) gives its `RemoteSequential`, `InferenceSession` or
`RemoteModelForCausalLM` a `SpotChecker`. After each span computation a server did for it
(a parallel forward, an inference step, a training backward), the checker audits it with
probability `book.audit_rate(subject, rate)`, decided with a CSPRNG in the caller's thread;
the audit itself runs in a worker thread (or inline), so the caller never waits for it.

An audit:

1. picks a check server at random among the servers whose record covers the hop's blocks,
   other than the primary's node (a node never checks itself) and not quarantined; none:
   the work stays unchecked, and no event is written (unaudited work earns nothing);
2. re-runs the same work there, through the same stubs and with the adapter the primary
   used (put there by content hash when the server lacks it):
   - FORWARD: a Forward of the same input;
   - INFERENCE: a parallel Forward of the hop's whole input history up to this step (what
     the session keeps for failover replay), of which the step's positions are compared;
   - BACKWARD: a Backward of the same input and output gradient in the same adapter mode,
     comparing the input gradient and the adapter part: every per-sample gradient (one
     vector per sample, tensors in name order) for PER_SAMPLE, the per-sample gradient
     norms (square roots of the squared norms) for NORMS. A NORMS check leaves nothing
     behind: its per-sample gradients, stored under a fresh `audit-...` step id, are
     consumed at once by a ClipSum with zero clip factors (and would expire otherwise);
3. compares each output part with `tolerance_for(primary precision, check precision,
   work, model_id=, hidden_size=)` (the model's calibrated entry, else one of its width,
   else the fallback: `corolla.verify.tolerance`; adapter gradients and norms with its
   relative L2 bound only); the work agrees
   when every part does, and the event carries the largest figures over the parts;
4. on disagreement runs a referee on a third node: the referee agreeing with the check
   and not the primary FAILs the subject; agreeing with the primary and not the check
   PASSes it and blames the check server; anything else, or no third node, is
   INCONCLUSIVE;
5. feeds the `AuditEvent` to the reputation book and hands it to the sink, followed by a
   `QuarantineEvent` for each subject the book newly quarantines; a quarantine also
   invalidates the routers attached with `attach`, so the next route leaves the node out.

The subject of an audit is the primary's node on the span its record announces (not the
hop's sub-span), so every hop a server computes counts towards one reputation.

The input and output hashes in events are `tensor_digest`s of named parts (`work.py`).

Modules: `checker.py` (sampling, the worker, verdicts, the book and the sink), `work.py`
(what is re-run and compared, and the canonical hash).
"""

from corolla.verify.spot_check.checker import ReputationSource, SpotChecker, SpotCheckSettings, SpotCheckStats, judge
from corolla.verify.spot_check.work import precision_of, tensor_digest

__all__ = [
    "ReputationSource",
    "SpotCheckSettings",
    "SpotCheckStats",
    "SpotChecker",
    "judge",
    "precision_of",
    "tensor_digest",
]
