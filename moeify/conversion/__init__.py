"""Conversion: trace regions, find dense FFNs, select sites, rewrite them into Switch layers."""
