"""One client of a multi-client DTensor run, started by tfscale-launch in tests.

    python tests/dtensor_worker_script.py INITIAL.npz OUT.npz

Trains `model()` for `STEPS` Adam steps on `data()` over the mesh
`batch=2,model=2` spanning every worker (2 logical CPUs each); the chief
writes the final weights to OUT.npz. The test compares them with
one-device training from the same initial weights.
"""

import sys

import numpy as np

import tfscale

STEPS = 6
GLOBAL_BATCH = 16


def model():
    import keras  # pylint: disable=import-outside-toplevel

    from tfscale.train import models  # pylint: disable=import-outside-toplevel

    built = models.transformer((8, 16), 5, model_dim=16, num_heads=4, mlp_dim=32, num_layers=1)
    built.compile(
        optimizer=keras.optimizers.Adam(learning_rate=3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return built


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * GLOBAL_BATCH, 8, 16)).astype("float32")
    y = rng.integers(0, 5, size=(STEPS * GLOBAL_BATCH,)).astype("int32")
    return x, y


def main(initial_npz, out_npz):
    tfscale.configure_devices(virtual_cpus=2)
    dist = tfscale.distribution("dtensor", mesh="batch=2,model=2", layout_map="megatron")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    with dist.scope():
        built = model()
    with np.load(initial_npz) as f:
        built.set_weights([f[f"w{i}"] for i in range(len(f.files))])
    x, y = data()
    built.fit(
        dist.distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)), GLOBAL_BATCH),
        epochs=1,
        verbose=2,
    )
    weights = built.get_weights()
    if dist.is_chief:
        np.savez(out_npz, **{f"w{i}": w for i, w in enumerate(weights)})
    print(
        f"OK workers={dist.num_workers} devices={len(dist.mesh.local_devices())} steps={int(built.optimizer.iterations.numpy())}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
