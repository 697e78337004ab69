"""Data contracts: shard schemas, the lookup markup grammar, and flow configs."""
