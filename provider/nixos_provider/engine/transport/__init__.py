"""Transport: the command runner, SSH (asyncssh and the OpenSSH client), the SSH agent."""
