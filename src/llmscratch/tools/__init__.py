"""Looking inside and measuring: attention maps and traces, experiments, benchmarks."""
