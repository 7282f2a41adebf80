"""Upstreams: header rules, one client per upstream, and the attempt plan."""
