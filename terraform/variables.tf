variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-central-1"
}

variable "name" {
  description = "Prefix for resource names."
  type        = string
  default     = "ztna"
}

variable "vpc_id" {
  description = "Existing VPC to use; empty creates one."
  type        = string
  default     = ""
}

variable "subnet_id" {
  description = "Existing public subnet for the intermediates; empty creates one (with the VPC)."
  type        = string
  default     = ""
}

variable "vpc_cidr" {
  description = "CIDR of the VPC created when vpc_id is empty."
  type        = string
  default     = "10.42.0.0/16"
}

variable "intermediate_instance_type" {
  description = "Instance type of the intermediates; a Graviton type (e.g. t4g.small) selects arm64 AMIs."
  type        = string
  default     = "t3.small"
}

variable "connector_instance_type" {
  description = "Instance type of the example connectors."
  type        = string
  default     = "t3.small"
}

variable "connector_count" {
  description = "Connector instances to create (0 when connectors run elsewhere)."
  type        = number
  default     = 0
}

variable "ami_id" {
  description = "AMI to boot; empty looks up the newest NixOS AMI for nixos_release and the instance architecture."
  type        = string
  default     = ""
}

variable "nixos_release" {
  description = "NixOS release of the AMI lookup."
  type        = string
  default     = "26.05"
}

variable "quic_port" {
  description = "UDP port of the intermediates (their `listen`)."
  type        = number
  default     = 4433
}

variable "ops_port" {
  description = "TCP port of the intermediates' ops endpoint (/metrics, /readyz) when it listens beyond loopback (the module's openOpsFirewall)."
  type        = number
  default     = 9470
}

variable "monitoring_cidrs" {
  description = "CIDRs allowed to scrape the ops port."
  type        = list(string)
  default     = []
}

variable "admin_cidrs" {
  description = "CIDRs allowed to SSH in (deploy-rs)."
  type        = list(string)
}

variable "ssh_public_key" {
  description = "Public key deploy-rs uses to log in as root."
  type        = string
}

variable "root_volume_size" {
  description = "Root volume size in GiB (gp3, encrypted)."
  type        = number
  default     = 20
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}

variable "endpoint_override" {
  description = "Test only: endpoint of a local AWS API emulator."
  type        = string
  default     = ""
}
