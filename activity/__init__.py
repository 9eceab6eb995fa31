"""What users did: logins, logouts and the actions they took."""
