"""torchao's own tensor-subclass test suites, run against MixedPrecisionDeltaTensor on CPU.

The mixins build a weight with `FACTORY_FN(hp_tensor, **kwargs)`; a delta tensor also needs a base,
so the factory treats `hp_tensor` as the fine-tuned weight and derives a base that differs from it
by a low-rank-plus-noise delta (a fine-tune in miniature).
"""

import unittest

import torch
from torchao.testing import utils as ao_testing

from deltacome_ao import MixedPrecisionDeltaTensor


def _delta_tensor_from_hp(hp_tensor, **kwargs):
    g = torch.Generator().manual_seed(0)
    m, n = hp_tensor.shape
    delta = (torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)) * 0.01
    delta += 1e-4 * torch.randn(m, n, generator=g)
    base = (hp_tensor.float() - delta.to(hp_tensor.device)).to(hp_tensor.dtype)
    return MixedPrecisionDeltaTensor.from_hp(hp_tensor, base, **kwargs)


_KWARGS = {"alpha": 0.5, "group_size": 32}
_NO_CUDA = "calls .cuda() unconditionally and this machine has no CUDA device"


# torchao instantiates its parametrized cases (cpu/cuda x dtypes) on the base classes; the
# subclasses below inherit the CPU ones.
class TestDeltaTensorBasic(ao_testing.TorchAOBasicTestCase):
    TENSOR_SUBCLASS = MixedPrecisionDeltaTensor
    FACTORY_FN = staticmethod(_delta_tensor_from_hp)
    kwargs = _KWARGS

    @unittest.skipUnless(torch.cuda.is_available(), _NO_CUDA)
    def test_device1_to_device2_device1_cpu_device2_cpu(self):
        super().test_device1_to_device2_device1_cpu_device2_cpu()


class TestDeltaTensorCompile(ao_testing.TorchAOCompileTestCase):
    TENSOR_SUBCLASS = MixedPrecisionDeltaTensor
    FACTORY_FN = staticmethod(_delta_tensor_from_hp)
    kwargs = _KWARGS

