import os
import shutil

# MKL's threaded SVD spins badly when the 2 cores are shared; passive waiting keeps it fast.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# No test reaches a model hub: huggingface_hub / transformers read this before their first use.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Without a GPU the Triton kernels are tested under the interpreter, which must be switched on
# before anything imports triton (torchao does).
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A compile cache of this test session's own: a shared /tmp/torchinductor_<user> can hold graphs
# compiled against an older operator schema of this library, or be half-written by a concurrent run.
_OWN_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="deltacome-tests-inductor-")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
