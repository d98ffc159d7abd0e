"""The aten operators a block of code dispatches, by name (test helper).

    with OpNames() as ops:
        f(x)
    assert "_linear_pointwise" in ops.names
"""

from torch.utils._python_dispatch import TorchDispatchMode


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
