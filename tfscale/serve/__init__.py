"""Real-time inference of trained Keras models: replicas, dynamic batching, routing."""
