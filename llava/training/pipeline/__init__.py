"""Pipelines: several training stages from one file (`python train_llava.py pipeline.yaml`), each a normal run in
`<output_dir>/<stage>/`, recorded in `<output_dir>/pipeline.json` so the same command resumes where it stopped.

The file and its command-line overrides, read into stages (`spec`); digests of what decides a stage's result
(`digests`); the manifest (`manifest`); what each stage does on this run, checked against the manifest (`plan`); the
plan printed without loading weights (`dry_run`); the pipeline's own flags (`arguments`); the checks that need
transformers, run in a process of their own (`check`); the stages run one subprocess each (`runner`).
"""
