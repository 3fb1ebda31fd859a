"""Media nodes on other hosts: the front's link (``nodes``) and a node's link (``node-link``)."""
