output "intermediate_public_ips" {
  description = "Elastic IP of each intermediate, by colour: deploy-rs hostnames (deploy.nodes.intermediate-<colour>.hostname)."
  value       = { for c, eip in aws_eip.intermediate : c => eip.public_ip }
}

output "intermediates" {
  description = "The `intermediates` list for connectors and agents (host:port, blue first)."
  value       = [for c in ["blue", "green"] : "${aws_eip.intermediate[c].public_ip}:${var.quic_port}"]
}

output "connector_hosts" {
  description = "Public IPs of the example connectors (deploy-rs hostnames)."
  value       = aws_instance.connector[*].public_ip
}

output "ami_ids" {
  description = "AMIs the instances booted."
  value       = { intermediate = local.intermediate_ami, connector = local.connector_ami }
}

output "security_group_ids" {
  description = "Security groups, for adding rules elsewhere."
  value       = { intermediate = aws_security_group.intermediate.id, connector = aws_security_group.connector.id }
}

output "deploy_hosts" {
  description = "deploy/hosts.json for the flake: each host's address and Nix system (aarch64-linux on Graviton types), so deploy-rs builds every host for its own architecture."
  value = {
    blue      = { hostname = aws_eip.intermediate["blue"].public_ip, system = local.nix_system[local.intermediate_arch] }
    green     = { hostname = aws_eip.intermediate["green"].public_ip, system = local.nix_system[local.intermediate_arch] }
    connector = length(aws_instance.connector) > 0 ? { hostname = aws_instance.connector[0].public_ip, system = local.nix_system[local.connector_arch] } : null
  }
}
