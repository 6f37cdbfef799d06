"""Benchmarks across methods: the one place that runs several methods' packages side by side on the same
images and judges them with ground truth none of them trained on (`localisation`). Above `pipelines`, beside
`serve`."""
