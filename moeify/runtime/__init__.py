"""Distributed runtime: process groups from a plan, verified shards, gradient averaging, the run loop."""
