"""Planner: topology graphs, cost model, search for a sharding plan, and calibration of expert loads."""
