#!/bin/sh
# Writes the app script for the flavour given as $1.
flavor="${1:-plain}"
cat <<EOS
#!/bin/sh
echo "greeter ($flavor): \$(cat "\$GREETING_FILE")"
EOS
