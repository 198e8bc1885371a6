#!/usr/bin/env bash
# Throwaway PKI for the TLS tests, made with the openssl command-line tool into OUT_DIR.
# Nothing here is committed or reused: every test run makes fresh keys in a temporary folder.
#
#   scripts/test-pki.sh OUT_DIR
#
# OUT_DIR/
#   ca.pem, ca.key                    test CA ("Nightingale Test CA")
#   server.pem, server.key            server certificate for 127.0.0.1 and localhost (SAN IP + DNS)
#   server2.pem, server2.key          a second one (another key and serial) for reload tests
#   client.pem, client.key            client certificate CN=nightingale-test-client,O=Nightingale Tests
#   other-ca.pem, other-ca.key        an unrelated CA
#   other-client.pem, other-client.key  a client certificate issued by the unrelated CA
#   san-client.pem, san-client.key   a client certificate with an empty subject, named by its
#                                     subject alternative names only (DNS, URI)
#   upn-alice.pem/.key, upn-bob.pem/.key  empty subjects, a UPN otherName each
#   expired.pem, expired.key          a server certificate valid in January 2020 only
#   client.enc.key, client.trad-enc.key  client.key encrypted (PKCS#8; traditional PEM)
# Each *.pem's SHA-256 fingerprint (lowercase hex, of the DER) is in *.sha256, and each
# certificate's subject as `openssl x509 -nameopt RFC2253` prints it in *.subject: the
# values tests compare against, computed here by openssl, not by the code under test.
set -euo pipefail

out=${1:?usage: test-pki.sh OUT_DIR}
mkdir -p "$out"
cd "$out"
days=7

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ca() { # name subject
    newkey "$1.key"
    openssl req -x509 -new -key "$1.key" -out "$1.pem" -days "$days" -subj "$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2>/dev/null
}

leaf() { # name issuer subject extensions
    newkey "$1.key"
    openssl req -new -key "$1.key" -out "$1.csr" -subj "$3" 2>/dev/null
    printf '%s\n' "$4" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -set_serial "0x$(openssl rand -hex 16)" \
        -days "$days" -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

server_ext='basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid'
client_ext='basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid'

ca ca "/CN=Nightingale Test CA"
ca other-ca "/CN=Unrelated Test CA"
leaf server ca "/CN=localhost" "$server_ext"
leaf server2 ca "/CN=localhost" "$server_ext"
leaf client ca "/O=Nightingale Tests/CN=nightingale-test-client" "$client_ext"
leaf other-client other-ca "/CN=untrusted-client" "$client_ext"
leaf san-client ca "/" "$client_ext
subjectAltName=DNS:workload.example,URI:spiffe://example.org/ns/radiology/sa/gateway"
# Empty subjects named by a UPN (otherName) only, as an AD CS template issues them.
leaf upn-alice ca "/" "$client_ext
subjectAltName=otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.example"
leaf upn-bob ca "/" "$client_ext
subjectAltName=otherName:1.3.6.1.4.1.311.20.2.3;UTF8:bob@corp.example"

# A server certificate that expired long ago: `openssl ca` sets both dates (`x509 -req` of
# OpenSSL 3.0 cannot).
newkey expired.key
openssl req -new -key expired.key -out expired.csr -subj "/CN=localhost" 2>/dev/null
mkdir -p ca-db && : > ca-db/index.txt && openssl rand -hex 16 > ca-db/serial
printf '%s\n' '[ca]' 'default_ca = test' '[test]' 'database = ca-db/index.txt' \
    'new_certs_dir = ca-db' 'serial = ca-db/serial' 'default_md = sha256' 'policy = any' \
    '[any]' 'commonName = supplied' > ca-db/ca.cnf
printf '%s\n' "$server_ext" > expired.ext
openssl ca -batch -config ca-db/ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr \
    -out expired.pem -extfile expired.ext -startdate 20200101000000Z -enddate 20200201000000Z \
    >/dev/null 2>&1
rm -rf ca-db expired.csr expired.ext

openssl pkcs8 -topk8 -in client.key -out client.enc.key -passout pass:secret 2>/dev/null
openssl ec -in client.key -out client.trad-enc.key -aes256 -passout pass:secret 2>/dev/null

for cert in ca server server2 client other-client; do
    openssl x509 -in "$cert.pem" -outform DER | openssl dgst -sha256 -r | cut -d' ' -f1 > "$cert.sha256"
    openssl x509 -in "$cert.pem" -noout -subject -nameopt RFC2253 | sed 's/^subject=//' > "$cert.subject"
done
