"""The bottom every service stands on: the document registry (one document and update stream per
environment), the event log, settings, file locations, device identity and the operations' error
type. Nothing here imports a service or the wiring above them."""
