"""What the daemon is told: the settings table, the cfg.yaml reader, the Go flag
parser, listen addresses and the memory budget.  Pure logic, no reactor.
"""
