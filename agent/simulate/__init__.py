"""A simulated fleet that speaks the agent's protocol (`shopfloor simulate`, docs/simulator.md).

  params.py    every rate and constant, tagged published / derived / estimate
  scenario.py  the ground truth drawn once from the seed: fleet, jobs, failures, storms, regimes
  signals.py   renders the scenario into catalog metrics, a block of steps at a time (numpy)
  trace.py     writes a trace directory (docs/trace-format.md)
  push.py      sends every node's batch through the agent's OTLP exporter
  cli.py       the command line

It needs numpy and pyarrow (the collector extra); the agent proper does not import it.
"""
