locals {
  # Graviton instance types (t4g, m7g, c7gn, ...) run arm64 images.
  intermediate_arch = can(regex("^[a-z]+[0-9]+g[a-z]*\\.", var.intermediate_instance_type)) ? "arm64" : "x86_64"
  connector_arch    = can(regex("^[a-z]+[0-9]+g[a-z]*\\.", var.connector_instance_type)) ? "arm64" : "x86_64"
  # The Nix system of each kind of host, for deploy-rs (output deploy_hosts).
  nix_system = { arm64 = "aarch64-linux", x86_64 = "x86_64-linux" }
  create_vpc = var.vpc_id == ""
  vpc_id     = local.create_vpc ? aws_vpc.this[0].id : var.vpc_id
  subnet_id  = var.subnet_id != "" ? var.subnet_id : aws_subnet.public[0].id
  colours    = toset(["blue", "green"])

  # Just enough NixOS configuration for deploy-rs to take over: root SSH with our key.
  user_data = <<-NIX
    { modulesPath, ... }: {
      imports = [ "$${modulesPath}/virtualisation/amazon-image.nix" ];
      services.openssh.enable = true;
      services.openssh.settings.PermitRootLogin = "prohibit-password";
      users.users.root.openssh.authorizedKeys.keys = [ "${var.ssh_public_key}" ];
      nix.settings.trusted-users = [ "root" ];
    }
  NIX
}

# NixOS's official AMIs (owner 427812963091), newest for the release and architecture.
data "aws_ami" "nixos" {
  for_each    = var.ami_id == "" ? toset(distinct([local.intermediate_arch, local.connector_arch])) : toset([])
  owners      = ["427812963091"]
  most_recent = true

  filter {
    name   = "name"
    values = ["nixos/${var.nixos_release}*-${each.key}-linux"]
  }
  filter {
    name   = "architecture"
    values = [each.key]
  }
}

locals {
  intermediate_ami = var.ami_id != "" ? var.ami_id : data.aws_ami.nixos[local.intermediate_arch].id
  connector_ami    = var.ami_id != "" ? var.ami_id : data.aws_ami.nixos[local.connector_arch].id
}

# --- network (only when no VPC is given) ---------------------------------------------------------

resource "aws_vpc" "this" {
  count                = local.create_vpc ? 1 : 0
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = { Name = "${var.name}-vpc" }
}

resource "aws_internet_gateway" "this" {
  count  = local.create_vpc ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  tags   = { Name = "${var.name}-igw" }
}

resource "aws_subnet" "public" {
  count                   = local.create_vpc ? 1 : 0
  vpc_id                  = aws_vpc.this[0].id
  cidr_block              = cidrsubnet(var.vpc_cidr, 8, 1)
  map_public_ip_on_launch = true
  tags                    = { Name = "${var.name}-public" }
}

resource "aws_route_table" "public" {
  count  = local.create_vpc ? 1 : 0
  vpc_id = aws_vpc.this[0].id
  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.this[0].id
  }
  tags = { Name = "${var.name}-public" }
}

resource "aws_route_table_association" "public" {
  count          = local.create_vpc ? 1 : 0
  subnet_id      = aws_subnet.public[0].id
  route_table_id = aws_route_table.public[0].id
}

# --- security groups -----------------------------------------------------------------------------

resource "aws_security_group" "intermediate" {
  name        = "${var.name}-intermediate"
  description = "ZTNA intermediates: QUIC from anywhere, ops from monitoring, SSH from admins"
  vpc_id      = local.vpc_id

  ingress {
    description      = "QUIC (agents and connectors)"
    protocol         = "udp"
    from_port        = var.quic_port
    to_port          = var.quic_port
    cidr_blocks      = ["0.0.0.0/0"]
    ipv6_cidr_blocks = ["::/0"]
  }

  dynamic "ingress" {
    for_each = length(var.monitoring_cidrs) > 0 ? [1] : []
    content {
      description = "ops endpoint (metrics, health) from monitoring"
      protocol    = "tcp"
      from_port   = var.ops_port
      to_port     = var.ops_port
      cidr_blocks = var.monitoring_cidrs
    }
  }

  ingress {
    description = "SSH for deploy-rs"
    protocol    = "tcp"
    from_port   = 22
    to_port     = 22
    cidr_blocks = var.admin_cidrs
  }

  egress {
    description      = "replies, NixOS updates, NTP"
    protocol         = "-1"
    from_port        = 0
    to_port          = 0
    cidr_blocks      = ["0.0.0.0/0"]
    ipv6_cidr_blocks = ["::/0"]
  }
}

resource "aws_security_group" "connector" {
  name        = "${var.name}-connector"
  description = "ZTNA connectors: no inbound but SSH from admins; they dial out"
  vpc_id      = local.vpc_id

  ingress {
    description = "SSH for deploy-rs"
    protocol    = "tcp"
    from_port   = 22
    to_port     = 22
    cidr_blocks = var.admin_cidrs
  }

  egress {
    description      = "to the intermediates, the backends and updates"
    protocol         = "-1"
    from_port        = 0
    to_port          = 0
    cidr_blocks      = ["0.0.0.0/0"]
    ipv6_cidr_blocks = ["::/0"]
  }
}

# --- identity: an instance role with no permissions ----------------------------------------------

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = "${var.name}-node"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name}-node"
  role = aws_iam_role.node.name
}

resource "aws_key_pair" "deploy" {
  key_name   = "${var.name}-deploy"
  public_key = var.ssh_public_key
}

# --- instances -----------------------------------------------------------------------------------

resource "aws_instance" "intermediate" {
  for_each               = local.colours
  ami                    = local.intermediate_ami
  instance_type          = var.intermediate_instance_type
  subnet_id              = local.subnet_id
  vpc_security_group_ids = [aws_security_group.intermediate.id]
  key_name               = aws_key_pair.deploy.key_name
  iam_instance_profile   = aws_iam_instance_profile.node.name
  user_data              = local.user_data

  metadata_options {
    http_tokens                 = "required" # IMDSv2 only
    http_endpoint               = "enabled"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type = "gp3"
    volume_size = var.root_volume_size
    encrypted   = true
  }

  tags = { Name = "${var.name}-intermediate-${each.key}", role = "intermediate", colour = each.key }

  lifecycle {
    # NixOS is managed by deploy-rs after the first boot; a new AMI must not replace the host.
    ignore_changes = [ami, user_data]
  }
}

resource "aws_eip" "intermediate" {
  for_each = local.colours
  domain   = "vpc"
  instance = aws_instance.intermediate[each.key].id
  tags     = { Name = "${var.name}-intermediate-${each.key}" }
}

resource "aws_instance" "connector" {
  count                  = var.connector_count
  ami                    = local.connector_ami
  instance_type          = var.connector_instance_type
  subnet_id              = local.subnet_id
  vpc_security_group_ids = [aws_security_group.connector.id]
  key_name               = aws_key_pair.deploy.key_name
  iam_instance_profile   = aws_iam_instance_profile.node.name
  user_data              = local.user_data

  metadata_options {
    http_tokens                 = "required"
    http_endpoint               = "enabled"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type = "gp3"
    volume_size = var.root_volume_size
    encrypted   = true
  }

  tags = { Name = "${var.name}-connector-${count.index}", role = "connector" }

  lifecycle {
    ignore_changes = [ami, user_data]
  }
}
