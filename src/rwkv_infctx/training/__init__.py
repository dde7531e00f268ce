"""Training: segmented exact BPTT (`segments`), the objective (`loss`), optimizer and schedule
(`optim`), the thin LightningModule (`module`) and the LightningCLI entry point (`cli`)."""
