// One GET through mtlsproxy with Java's own HttpClient, as a Java service would
// call it: client key from a PKCS#12 keystore, trust from a PKCS#12 truststore.
// Run as a single-file program (Java 11+): java JavaClient.java URL KEYSTORE
// KEYSTORE_PASSWORD TRUSTSTORE TRUSTSTORE_PASSWORD; prints the status, then the body.
import java.io.FileInputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.security.KeyStore;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

public class JavaClient {
    static KeyStore load(String path, char[] password) throws Exception {
        KeyStore store = KeyStore.getInstance("PKCS12");
        try (FileInputStream in = new FileInputStream(path)) {
            store.load(in, password);
        }
        return store;
    }

    public static void main(String[] args) throws Exception {
        char[] keyPassword = args[2].toCharArray();
        KeyManagerFactory keys = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        keys.init(load(args[1], keyPassword), keyPassword);
        TrustManagerFactory trust = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        trust.init(load(args[3], args[4].toCharArray()));
        SSLContext tls = SSLContext.getInstance("TLS");
        tls.init(keys.getKeyManagers(), trust.getTrustManagers(), null);
        HttpClient client = HttpClient.newBuilder().sslContext(tls).version(HttpClient.Version.HTTP_1_1).build();
        HttpResponse<String> response = client.send(
            HttpRequest.newBuilder(URI.create(args[0])).build(), HttpResponse.BodyHandlers.ofString());
        System.out.println(response.statusCode());
        System.out.print(response.body());
    }
}
