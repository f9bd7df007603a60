"""Examples sharded over a mesh of 8 simulated CPU devices: the same supports as on one device.

XLA's device count is fixed when JAX starts, so the check runs in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxprune as jp
    from jaxprune.models import mlpnet
    assert len(jax.devices()) == 8, jax.devices()
    model = mlpnet()
    v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(512, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 512), jnp.int32)
    rows = NamedSharding(Mesh(np.array(jax.devices()), ("examples",)), P("examples"))
    xs, ys = jax.device_put(x, rows), jax.device_put(y, rows)
    G = jp.per_example_grads(jp.classification_loss(model.apply), v, (xs, ys), show_progress=False)
    assert not G.sharding.is_fully_replicated and len(G.sharding.device_set) == 8, G.sharding
    assert {s.data.shape[0] for s in G.addressable_shards} == {64}   # each device holds its 64 rows
    k = jp.k_from_sparsity(v, 0.9)
    for method in (jp.lr, jp.ewr):
        one = method(v, (x, y), k, apply_fn=model.apply, stages=2, show_progress=False)
        eight = method(v, (xs, ys), k, apply_fn=model.apply, stages=2, show_progress=False)
        for a, b in zip(jax.tree_util.tree_leaves(one.masks), jax.tree_util.tree_leaves(eight.masks)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("OK")
""")


def test_sharded_batch_keeps_the_support_and_shards_g():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAXPRUNE_NO_PROGRESS="1")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
