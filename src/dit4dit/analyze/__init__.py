"""Baselines and ablations of the paper (`dit4dit analyze`, whose flags are in `dit4dit.cli.analyze`).

- `grid`: the cells (named variants `joint`, `joint_detached`, `action_only`, `decoupled`,
  `static_image`; ablation grids `feature_blocks`, `feature_denoise_steps`, `tau_f`, `demos`);
- `runner`: train every stage of each cell x seed, evaluate closed loop, analyse the features,
  one `result.json` per run folder, resumable (`run_analysis(Study(...))`);
- `prior`: the video-prior study (`--study prior`): its task lists, shared pretraining runs, arms,
  the paired bootstrap of arm differences and its report section;
- `features`: phase-labelled features, silhouette score and t-SNE (numpy);
- `report`: aggregate over seeds (Wilson CIs over pooled episodes), `results.md`, plots;
- `summary`: the plan of a dry run and the summary table the command prints.
"""
