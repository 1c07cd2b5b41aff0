"""`tf.distribute` strategies behind the distribution kinds."""
