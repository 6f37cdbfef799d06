"""cxr_ddpm (covariate DDPM): cohort specs (`spec`), cohort generation (`generate`), the detector experiment
(`echo_sets`, `detector`, `detector_fits`, `experiment`), the synthetic-set audit (`synthetic_audit`) and the
paper's miniature (`reproduce`)."""
