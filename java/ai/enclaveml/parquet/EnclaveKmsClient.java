package ai.enclaveml.parquet;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.SecureRandom;
import java.util.Base64;
import java.util.HashMap;
import java.util.Map;
import java.util.TreeMap;
import javax.crypto.AEADBadTagException;
import javax.crypto.Cipher;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.SecretKeySpec;
import org.apache.hadoop.conf.Configuration;
import org.apache.parquet.crypto.KeyAccessDeniedException;
import org.apache.parquet.crypto.keytools.KmsClient;

/**
 * parquet-mr's {@code KmsClient} over the primary keys enclaveml released to this JVM.
 *
 * <p>Interoperates with the Python standard flavour ({@code enclaveml.crypto.parquet}), so
 * pyarrow and Spark read each other's files. Parquet's master key identifier is our key name.
 * The wrapped key string is
 *
 * <pre>eml1:&lt;kms&gt;:&lt;key id&gt;:&lt;version&gt;:&lt;base64url(nonce(12) || AES-256-GCM ciphertext+tag), no padding&gt;</pre>
 *
 * with {@code aad = "enclaveml/keywrap/v1" || 0 || key_id || 0 || u32be(version) ||
 * "enclaveml parquet data key v1"} ({@code docs/format.md}, "Local key wrap"). Wrapping uses
 * the newest version of the named key; unwrapping the exact (key id, version) the string names.
 *
 * <p>The keys come from the Hadoop configuration, set in memory by the Python driver:
 * {@value #KEYS_PROPERTY} = {@code name|key_id|version|base64(kek);...} and
 * {@value #KMS_NAME_PROPERTY} = the KMS name recorded in wrapped keys. The property name
 * contains "secret" so Spark's default {@code spark.redaction.regex} redacts it. Error messages
 * start with {@code enclaveml-<reason>:} so the Python side can map them to its error types;
 * they never contain key material.
 */
public final class EnclaveKmsClient implements KmsClient {
  public static final String KEYS_PROPERTY = "enclaveml.kms.secret.keys";
  public static final String KMS_NAME_PROPERTY = "enclaveml.kms.name";

  private static final String TAG = "eml1";
  private static final byte[] LABEL = "enclaveml/keywrap/v1\0".getBytes(StandardCharsets.UTF_8);
  private static final byte[] ASSOCIATED_DATA =
      "enclaveml parquet data key v1".getBytes(StandardCharsets.US_ASCII);
  private static final int NONCE_SIZE = 12;
  private static final int KEY_SIZE = 32;
  private static final int TAG_BITS = 128;
  private static final int WRAPPED_SIZE = NONCE_SIZE + KEY_SIZE + TAG_BITS / 8;
  private static final SecureRandom RANDOM = new SecureRandom();

  private String kmsName;
  private final Map<String, String> keyIdByName = new HashMap<>();
  private final Map<String, TreeMap<Integer, byte[]>> keksByKeyId = new HashMap<>();

  @Override
  public void initialize(
      Configuration configuration, String kmsInstanceID, String kmsInstanceURL, String accessToken)
      throws KeyAccessDeniedException {
    String keys = configuration.get(KEYS_PROPERTY);
    kmsName = configuration.get(KMS_NAME_PROPERTY);
    if (keys == null || keys.isEmpty() || kmsName == null || kmsName.isEmpty()) {
      throw new KeyAccessDeniedException(
          "enclaveml-no-keys: no enclaveml keys were handed to this JVM (" + KEYS_PROPERTY + " unset)");
    }
    for (String entry : keys.split(";")) {
      String[] f = entry.split("\\|", -1);
      if (f.length != 4) {
        throw new KeyAccessDeniedException("enclaveml-config: malformed " + KEYS_PROPERTY + " entry");
      }
      byte[] kek;
      int version;
      try {
        kek = Base64.getDecoder().decode(f[3]);
        version = Integer.parseInt(f[2]);
      } catch (IllegalArgumentException e) {
        throw new KeyAccessDeniedException("enclaveml-config: malformed " + KEYS_PROPERTY + " entry");
      }
      if (kek.length != KEY_SIZE) {
        throw new KeyAccessDeniedException("enclaveml-config: a key in " + KEYS_PROPERTY + " is not 32 bytes");
      }
      keyIdByName.put(f[0], f[1]);
      keksByKeyId.computeIfAbsent(f[1], k -> new TreeMap<>()).put(version, kek);
    }
  }

  @Override
  public String wrapKey(byte[] keyBytes, String masterKeyIdentifier) throws KeyAccessDeniedException {
    if (keyBytes.length != KEY_SIZE) {
      throw new KeyAccessDeniedException(
          "enclaveml-config: data keys must be 256 bits (set parquet.encryption.data.key.length.bits=256)");
    }
    String keyId = keyIdByName.getOrDefault(masterKeyIdentifier, masterKeyIdentifier);
    TreeMap<Integer, byte[]> versions = keksByKeyId.get(keyId);
    if (versions == null) {
      throw new KeyAccessDeniedException(
          "enclaveml-key-not-found: key " + masterKeyIdentifier + " was not released to this job");
    }
    Map.Entry<Integer, byte[]> newest = versions.lastEntry();
    byte[] nonce = new byte[NONCE_SIZE];
    RANDOM.nextBytes(nonce);
    byte[] sealed = gcm(Cipher.ENCRYPT_MODE, newest.getValue(), nonce, aad(keyId, newest.getKey()), keyBytes);
    byte[] wrapped = ByteBuffer.allocate(NONCE_SIZE + sealed.length).put(nonce).put(sealed).array();
    return String.join(
        ":", TAG, kmsName, keyId, Integer.toString(newest.getKey()),
        Base64.getUrlEncoder().withoutPadding().encodeToString(wrapped));
  }

  @Override
  public byte[] unwrapKey(String wrappedKey, String masterKeyIdentifier) throws KeyAccessDeniedException {
    String[] f = wrappedKey.split(":", -1);
    if (f.length != 5 || !TAG.equals(f[0]) || f[1].isEmpty() || f[2].isEmpty() || !f[3].matches("[0-9]{1,9}")) {
      throw new KeyAccessDeniedException(
          "enclaveml-format: the Parquet key metadata does not hold an enclaveml wrapped key");
    }
    if (!f[1].equals(kmsName)) {
      throw new KeyAccessDeniedException(
          "enclaveml-key-not-found: the file's key is held by the '" + f[1] + "' KMS, not '" + kmsName + "'");
    }
    int version = Integer.parseInt(f[3]);
    TreeMap<Integer, byte[]> versions = keksByKeyId.get(f[2]);
    byte[] kek = versions == null ? null : versions.get(version);
    if (kek == null) {
      throw new KeyAccessDeniedException(
          "enclaveml-key-not-found: key " + f[2] + " version " + version + " was not released to this job");
    }
    byte[] wrapped;
    try {
      wrapped = Base64.getUrlDecoder().decode(f[4]);
    } catch (IllegalArgumentException e) {
      throw new KeyAccessDeniedException("enclaveml-format: the wrapped key is not base64url");
    }
    if (wrapped.length != WRAPPED_SIZE) {
      throw new KeyAccessDeniedException("enclaveml-integrity: the wrapped data key has the wrong length");
    }
    byte[] nonce = java.util.Arrays.copyOfRange(wrapped, 0, NONCE_SIZE);
    byte[] body = java.util.Arrays.copyOfRange(wrapped, NONCE_SIZE, wrapped.length);
    return gcm(Cipher.DECRYPT_MODE, kek, nonce, aad(f[2], version), body);
  }

  private static byte[] aad(String keyId, int version) {
    byte[] id = keyId.getBytes(StandardCharsets.UTF_8);
    return ByteBuffer.allocate(LABEL.length + id.length + 1 + 4 + ASSOCIATED_DATA.length)
        .put(LABEL).put(id).put((byte) 0).putInt(version).put(ASSOCIATED_DATA).array();
  }

  private static byte[] gcm(int mode, byte[] kek, byte[] nonce, byte[] aad, byte[] input)
      throws KeyAccessDeniedException {
    try {
      Cipher cipher = Cipher.getInstance("AES/GCM/NoPadding");
      cipher.init(mode, new SecretKeySpec(kek, "AES"), new GCMParameterSpec(TAG_BITS, nonce));
      cipher.updateAAD(aad);
      return cipher.doFinal(input);
    } catch (AEADBadTagException e) {
      throw new KeyAccessDeniedException(
          "enclaveml-integrity: data key does not unwrap: the key metadata was modified or the key is wrong");
    } catch (GeneralSecurityException e) {
      throw new KeyAccessDeniedException("enclaveml-config: AES-GCM is unavailable: " + e.getClass().getName());
    }
  }
}
