"""DiffChest (diffusion autoencoder): a linear probe on z (`head`, `probe`), patient-specific
counterfactuals (`counterfactual`, the `explain` job), the confounder `audit`, and their evaluation against
the phantoms' ground truth (`cf_eval`) by a judge that never saw the confounder (`cf_judge`)."""
