"""``python -m fusednn bench``: checks every kernel against the float64
reference, then times it against the memory roof, the reference and the
peers a user would pick instead: PyTorch eager, ``torch.compile`` and
``jax.jit`` (each when installed, each with its output checked by the same
bounds as fusednn's), and compares a run with an earlier one.

What a row counts: ``bytes/elem`` is the memory traffic one element costs
(an activation's forward reads x and writes y: 1 read + 1 write; its
backward reads grad_output and x or y and writes grad_input: 2 reads + 1
write; batch norm's forward reads x twice, for the statistics and to
normalize, and writes y: 2 reads + 1 write; its backward reads x and
grad_output twice each and writes grad_input: 4 reads + 1 write). GB/s is
bytes moved (elements x bytes/elem) per second, 1 GB = 1e9 bytes. The roof
is a plain copy of the same number of bytes, timed in each row's rounds
(a row's % roof uses the copies of its own rounds): on the CPU the faster of
``fusednn._cpu.copy`` (threaded, storing as the kernels do) and
``np.copyto``; on the GPU (``--device cuda``) the faster of a
device-to-device ``cudaMemcpyAsync`` and ``cupy.copyto``. The copy's
buffers are as large as a row's arrays, so where those fit in the CPU's
last-level cache (``--quick``'s 2^22 elements on a large L3) the roof is an
in-cache copy's rate, as the kernel's is an in-cache rate; the report says
which. Rows above 110% of their roof are marked ``^`` with a footnote on
why (batch norm counts the bytes it reads twice, the second time from the
cache when they fit). The report's text is wrapped to 100 columns. The copy, the numpy reference and the peers are timed
in the same rounds as each kernel (one call of each per round, medians over
the rounds), so that the load of a busy machine hits them alike and every
ratio comes from one run. Compilation (torch.compile, jax.jit) happens
before the rounds and is reported once. GPU work is timed with CUDA events
on CuPy's current stream, with the GPU held busy while the host enqueues
each timed call, so that only device time counts; the numpy reference
always runs on the host, by wall clock.

The modules: ``cli`` (options, the family registry, run), one per kernel
family (``activations``, ``batchnorm``, ``dropout``: cases, checks, peer
functions), ``checks`` (errors against the reference), ``cases`` (the
types they share), ``peers`` (importing and compiling the peers),
``timing`` (clocks, rounds, copy roofs) and ``output`` (table, JSON, plot,
``--compare``).
"""
from .cases import BenchError, UsageError
from .cli import add_arguments, run

__all__ = ["BenchError", "UsageError", "add_arguments", "run"]
