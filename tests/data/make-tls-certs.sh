# Makes a test CA, a server certificate (127.0.0.1, localhost) in srv/ and a client
# certificate in cli/, in QEMU's tls-creds-x509 layout. Run in an empty directory.
set -e
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 3650 -subj "/CN=qimg test CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout srv/server-key.pem -out srv.csr -subj "/CN=localhost" 2>/dev/null
printf "subjectAltName=IP:127.0.0.1,DNS:localhost\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n" > srv.ext
openssl x509 -req -in srv.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out srv/server-cert.pem -days 3650 -extfile srv.ext 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout cli/client-key.pem -out cli.csr -subj "/CN=client" 2>/dev/null
printf "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n" > cli.ext
openssl x509 -req -in cli.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out cli/client-cert.pem -days 3650 -extfile cli.ext 2>/dev/null
cp ca-cert.pem srv/; cp ca-cert.pem cli/
