"""The homework-6 parts, apart from the generic engine: smallNet, CIFAR-10, the course's verify, Problems 2-6."""
