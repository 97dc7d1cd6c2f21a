"""The Kubernetes operator: renders R1Deployments into KubeRay objects."""
