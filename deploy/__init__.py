"""The operator's tools: `edge-deploy` (keys, flash, update, commands) and `edge-monitor`.

The systemd unit, the board config, the installers and the Ansible playbook live beside the
code as package data, so an installed wheel flashes boards as a checkout does
(`deploy.files`).
"""
