"""One GPU check for both families: `python -m bench.gpu` from the repository root.

Modules, one measurement each: `selfchecks` (the fast kernels' first-use checks), `kernels` (WKV-4
and WKV-7 forward + backward at the issue's shapes against our references and the H200 anchors),
`bptt_rows` (the 1.5B models' exact segmented BPTT: tokens/s, MFU, peak memory, boundary states on
the device and on the host), with `models` (building them on the device) and `table` (rows, the
error guard, timing). README.md beside this file says how to run it on a machine without network.
"""
