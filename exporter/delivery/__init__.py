"""Delivery: where an export landed, verification at the destination, completion signals.

`landing` derives the export folder's URI; `stores` read it through the storage's protocol;
`verify` compares it with the run's metrics; `signals` writes `_SUCCESS` and the manifest and
sends the webhook. Verification is opt-in per destination (its `verify` section).
"""
