"""VMs with a ready agent: boot configurations, the agent client, and the factories
that make VMs (direct boot, a cache of booted VMs, clones of a template)."""
