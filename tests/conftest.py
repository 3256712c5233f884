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
