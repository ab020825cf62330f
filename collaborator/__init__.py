"""The collaborator: joins a federation, trains locally and submits encoded updates."""
