"""One worker of the multi-worker tests (TF_CONFIG comes from the test).

Usage: multi_worker_script.py MODE INITIAL_NPZ OUT_NPZ [STEPS_PER_EXECUTION]
  MODE=stock:   plain tf.distribute.MultiWorkerMirroredStrategy + Keras fit;
                prints "UPSTREAM_FAILURE <message>" when fit raises.
  MODE=tfscale: tfscale.distribution("multi_worker_mirrored"): fit, evaluate
                and predict; saves the trained weights to OUT_NPZ, prints "OK".
or:    multi_worker_script.py linger_stock|linger_tfscale
  one all-reduce, then worker 0 stays LINGER_S longer than worker 1.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

STEPS = 20
GLOBAL_BATCH = 32
# Longer than the coordination service's heartbeat timeout (10 s).
LINGER_S = 14


def linger(mode):
    import tensorflow as tf

    import tfscale

    if mode == "linger_stock":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tfscale.distribution("multi_worker_mirrored").strategy
    total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    print("SUM", float(total), flush=True)
    if strategy.cluster_resolver.task_id == 0:
        time.sleep(LINGER_S)


def main(mode, initial_npz, out_npz, steps_per_execution="1"):
    import keras
    import tensorflow as tf

    import tfscale
    from tfscale.data import synthetic
    from tfscale.train import models

    # Collective ops are configured when the strategy is made: before any op.
    if mode == "stock":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        dist = tfscale.distribution("multi_worker_mirrored")
    images, labels = synthetic.generate(STEPS * GLOBAL_BATCH, seed=7)
    data = tf.data.Dataset.from_tensor_slices((images[..., None].astype("float32") / 255.0, labels))
    with np.load(initial_npz) as saved:
        initial = [saved[f"w{i}"] for i in range(len(saved.files))]
    if mode == "stock":
        scope, dataset = strategy.scope(), data.batch(GLOBAL_BATCH)
    else:
        scope, dataset = dist.scope(), dist.distribute_dataset(data, GLOBAL_BATCH)
    with scope:
        model = models.build("lenet", (28, 28, 1), 10)
        model.set_weights(initial)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
            loss=models.loss("lenet"),
            metrics=["accuracy"],
            steps_per_execution=int(steps_per_execution),
        )
    try:
        model.fit(dataset, epochs=1, steps_per_epoch=STEPS, shuffle=False, verbose=0)
    except ValueError as e:
        if mode == "stock":
            print("UPSTREAM_FAILURE", str(e).splitlines()[0], flush=True)
            return
        raise
    logs = model.evaluate(dataset, steps=4, verbose=0, return_dict=True)
    predictions = model.predict(images[:8, ..., None].astype("float32") / 255.0, verbose=0)
    np.savez(out_npz, *model.get_weights())
    print("OK", f"accuracy={logs['accuracy']:.4f}", f"predict={predictions.shape}", flush=True)


def train_mirrored_reference(initial, out_npz):
    """The same training with `mirrored` over 2 logical CPUs in this process."""
    import keras
    import tensorflow as tf

    import tfscale
    from tfscale.data import synthetic
    from tfscale.train import models

    dist = tfscale.distribution("mirrored", devices=2)
    images, labels = synthetic.generate(STEPS * GLOBAL_BATCH, seed=7)
    data = tf.data.Dataset.from_tensor_slices((images[..., None].astype("float32") / 255.0, labels))
    with dist.scope():
        model = models.build("lenet", (28, 28, 1), 10)
        model.set_weights(initial)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
            loss=models.loss("lenet"),
        )
    model.fit(
        dist.distribute_dataset(data, GLOBAL_BATCH),
        epochs=1,
        steps_per_epoch=STEPS,
        shuffle=False,
        verbose=0,
    )
    np.savez(out_npz, *model.get_weights())
    return model.get_weights()


if __name__ == "__main__":
    if sys.argv[1].startswith("linger_"):
        linger(sys.argv[1])
    else:
        main(*sys.argv[1:])
