"""The plumbing under the method's stage files (envs.py, sft.py, opcd.py, evaluate.py, merge.py, pipeline.py at
the repository root): the data layer and its row kinds (splits, pictures, dynamics, grids), the model layer
(common, lora, optim), the command-line rules (cli), the endpoint clients (chat_api), the benchmark importer
(benchmarks) and the tiny-model factory (tiny). Imported by name (`from mgsd import common`); nothing is
imported here, so that a stage pulls in only what it uses. Commands that live here: `python -m mgsd.tiny`,
`python -m mgsd.benchmarks`.
"""
