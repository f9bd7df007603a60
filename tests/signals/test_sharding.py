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
        # the defaults (materialised G) and the official preset (matrix-free products)
        for kw in ({"stages": 2}, {"official": True}):
            one = method(v, (x, y), k, apply_fn=model.apply, show_progress=False, **kw)
            eight = method(v, (xs, ys), k, apply_fn=model.apply, show_progress=False, **kw)
            assert eight.info["options"].signals == ("matrix_free" if "official" in kw else "materialized")
            for a, b in zip(jax.tree_util.tree_leaves(one.masks), jax.tree_util.tree_leaves(eight.masks)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("OK")
""")


def test_sharded_batch_keeps_the_support_and_shards_g():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAXPRUNE_NO_PROGRESS="1")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


STRUCTURED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxprune as jp
    from jaxprune.models import mlpnet
    assert len(jax.devices()) == 8, jax.devices()
    model = mlpnet()
    v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(256, 28, 28, 1)), jnp.float32)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    # fc1's kernel split over its 784 input rows, the rest replicated: a model too big for one device
    spec = lambda path, leaf: P("d", None) if leaf.shape[0] % 8 == 0 and leaf.ndim == 2 else P()
    vs = jax.tree_util.tree_map_with_path(
        lambda p, leaf: jax.device_put(leaf, NamedSharding(mesh, spec(p, leaf))), v)
    assert len(vs["params"]["fc1"]["kernel"].sharding.device_set) == 8
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    groups = jp.groups(model.apply, v, x[:1])
    runs = {"prune_channels": lambda t, b: jp.prune_channels(t, groups, 0.5, show_progress=False),
            "intra_fusion": lambda t, b: jp.intra_fusion(t, groups, 0.5, show_progress=False),
            "ispasp": lambda t, b: jp.ispasp(t, groups, 0.5, apply_fn=model.apply, batch=b, show_progress=False)}
    for name, run in runs.items():
        one, eight = run(v, x), run(vs, xs)
        assert {g: list(k) for g, k in one.kept.items()} == {g: list(k) for g, k in eight.kept.items()}, name
        for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(eight.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name)
        assert eight.params["params"]["fc1"]["kernel"].shape == (784, 20), name
    # conv kernels: default pruning reduces them where they live and scores on the host
    from jaxprune.models import resnet20
    from jaxprune.structure.importance import MagnitudeScores
    cnn = resnet20()
    vc = cnn.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    stats = np.random.default_rng(2)   # statistics away from (0, 1), so that official=True's fold is not trivial
    vc = {"params": vc["params"], "batch_stats": jax.tree_util.tree_map(
        lambda a: jnp.asarray(stats.uniform(0.5, 1.5, a.shape), jnp.float32), vc["batch_stats"])}
    vcs = jax.device_put(vc, NamedSharding(mesh, P()))
    cgroups = jp.groups(cnn.apply, vc, jnp.zeros((1, 32, 32, 3)))
    # a Dense kernel pruned on both axes would come to the host whole: such trees are written instead
    r = np.random.default_rng(1)
    vd = {n: {"kernel": jnp.asarray(r.normal(size=(32, 32)), jnp.float32)} for n in ("d1", "d2", "d3")}
    vds = jax.device_put(vd, NamedSharding(mesh, P()))
    dgroups = [jp.make_group(vd, [("d1/kernel", 1)], [("d2/kernel", 0)]),
               jp.make_group(vd, [("d2/kernel", 1)], [("d3/kernel", 0)])]
    assert MagnitudeScores.applies(vcs, list(cgroups)) and MagnitudeScores.applies(vs, list(groups))
    assert MagnitudeScores.applies(vd, dgroups) and not MagnitudeScores.applies(vds, dgroups)
    mixed = jax.tree_util.tree_map_with_path(lambda q, a: np.asarray(a) if "conv1" in jax.tree_util.keystr(q) else a, vcs)
    assert MagnitudeScores.applies(mixed, list(cgroups))   # numpy and device kernels together
    for mode, official, (gs, host, sharded) in (("shrink", False, (cgroups, vc, vcs)), ("mask", False, (cgroups, vc, vcs)),
                                                ("shrink", True, (cgroups, vc, vcs)), ("shrink", False, (dgroups, vd, vds))):
        one, eight = (jp.prune_channels(t, gs, 0.5, mode=mode, official=official, show_progress=False)
                      for t in (host, sharded))
        assert {g: list(k) for g, k in one.kept.items()} == {g: list(k) for g, k in eight.kept.items()}, mode
        for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(eight.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=mode)
    print("OK")
""")


def test_structured_methods_take_sharded_parameters():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAXPRUNE_NO_PROGRESS="1")
  proc = subprocess.run([sys.executable, "-c", STRUCTURED], capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
