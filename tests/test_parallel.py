import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from himar_jax.parallel import mesh as mesh_lib
from himar_jax.parallel import sharding as sharding_lib


def test_resolve_mesh_shape_fills_minus_one():
  assert mesh_lib.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert mesh_lib.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  assert mesh_lib.resolve_mesh_shape((1, 2, 4), 8) == (1, 2, 4)


@pytest.mark.parametrize("shape,match", [
    ((-1, -1, 1), "more than one -1"),
    ((3, -1, 1), "not divisible"),
    ((2, 2, 1), "uses 4 devices but 8"),
    ((8, 1), "must have 3 entries"),
    ((0, -1, 1), "0 or below -1"),
])
def test_resolve_mesh_shape_errors_name_the_value(shape, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.resolve_mesh_shape(shape, 8)


def test_make_mesh_uses_all_devices():
  mesh = mesh_lib.make_mesh((2, 2, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.devices.size == len(jax.devices()) == 8


def test_logical_rules_map_and_respect_divisibility():
  mesh = mesh_lib.make_mesh((2, 2, 2))
  assert sharding_lib.logical_to_mesh_spec(("embed", "mlp"), (16, 32), mesh) == P("fsdp", "tensor")
  assert sharding_lib.logical_to_mesh_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
  # 3 is not divisible by fsdp=2: replicated instead of an invalid sharding.
  assert sharding_lib.logical_to_mesh_spec(("embed", "mlp"), (3, 32), mesh) == P(None, "tensor")
  # Batch of 2 can take only the data axis.
  assert sharding_lib.logical_to_mesh_spec(("batch",), (2,), mesh) == P("data")
  with pytest.raises(KeyError, match="no rule"):
    sharding_lib.logical_to_mesh_spec(("nonsense",), (4,), mesh)


def test_shard_batch_splits_leading_dim_over_data_and_fsdp():
  mesh = mesh_lib.make_mesh((2, 2, 2))
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  out = sharding_lib.shard_batch({"x": x}, mesh)["x"]
  assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(out), x)
  assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}
