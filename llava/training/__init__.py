"""Stage 3: a training run. Flags (`arguments`, `architecture_arguments`, `parsing`) -> parts built from them (`build`)
-> the run top to bottom (`run`) on the `Trainer` subclass (`trainer`) with its callbacks (`callbacks`,
`preemption`), crash-safe checkpoints (`checkpoints`) that may hold only the trainable weights
(`trainable_weights`), one run per output_dir (`run_lock`) and multi-process decisions (`distributed`)."""
