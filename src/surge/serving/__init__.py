"""surge on a cluster: a chat model's engine cores, and each embedding or rerank model's encoder
workers, as remote hosts (Ray Serve deployments) behind the same front end, API and app as
`surge serve`. Ray itself is imported only by surge.serving.ray and surge.serving.encoder_host
(the optional `surge[ray]` extra); the rest is plain asyncio and tested without Ray."""
