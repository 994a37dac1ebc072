"""lbnode: the proxy node of a clustered HTTP load balancer."""
