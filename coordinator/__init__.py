"""The central coordinator: owns the Flower SuperLink and the model registry; never sees a patient row."""
