import Authority
import Crypto
import Encoding
import Foundation
import Ledger
import Storage
import Synchronization
import SwiftASN1
import X509

/// The trust domain's authorities as this node uses them: the keyring in
/// the ledger (`AuthorityKeyring`) unsealed with the key-encryption key,
/// the bundle of what is published now, the revocation rules, and the
/// CRLs. Every node can unseal the keys; only the leader signs identities.
public final class AuthorityService: Sendable {
    /// One published authority, unsealed.
    public struct Authority: Sendable {
        public let entry: AuthorityKeyring.Entry
        public let x509: X509Authority
        public let jwt: JWTAuthority
        public var id: String { entry.id }
    }

    /// A class: a request takes it out of the cache, and copying a struct
    /// of this many references cost a retain and a release each.
    public final class Keys: Sendable {
        /// The authority that signs.
        public let active: Authority
        /// Every authority bundles publish now (prepared, active, retired
        /// until its identities expire).
        public let published: [Authority]
        public let bundle: TrustBundle
        public let bundlePEM: String
        public let revocations: RevocationList
        /// The keyring document's version and the revocation list's (0
        /// without one): replicated, the same on every node that applied
        /// them (unlike the bundle's sequence, which also counts retired
        /// authorities each node's clock has dropped).
        public let keyringVersion: UInt64
        public let revocationsVersion: UInt64
        /// JWT-SVIDs whose signature verified under `bundle`'s keys: a
        /// relying service presents the same token on every call.
        public let jwtSignatures = SignatureMemo()
        /// X.509 chains (as PEM) verified under `bundle`'s authorities.
        public let x509Chains = VerificationMemo<TrustBundle.MemoizedX509>()
        public var x509: X509Authority { active.x509 }
        public var jwt: JWTAuthority { active.jwt }

        init(active: Authority, published: [Authority], bundle: TrustBundle, bundlePEM: String, revocations: RevocationList,
             keyringVersion: UInt64, revocationsVersion: UInt64) {
            self.keyringVersion = keyringVersion
            self.revocationsVersion = revocationsVersion
            self.active = active
            self.published = published
            self.bundle = bundle
            self.bundlePEM = bundlePEM
            self.revocations = revocations
        }

        /// The rule that revokes an identity, if any; `recordIndex` gives
        /// the log index of its issuance record (see `Revocation`).
        public func revocation(serial: String, spiffeID: String, attributes: Attributes, issuedAt: Date,
                               recordIndex: () -> UInt64? = { nil }) -> Revocation? {
            revocations.revoking(serial: serial, spiffeID: spiffeID, attributes: attributes,
                                 issuedAtMillis: UInt64(max(0, issuedAt.timeIntervalSince1970 * 1000)), recordIndex: recordIndex)
        }
    }

    private struct Cache {
        var keyringVersion: UInt64
        var revocationsVersion: UInt64
        var keys: Keys
        var checked: ContinuousClock.Instant
        /// When the next retired authority leaves the bundle.
        var nextDropMillis: UInt64
        var unsealed: [String: Authority]
    }

    public let trustDomain: String
    public let keyAlgorithm: KeyAlgorithm
    private let kek: SymmetricKey
    private let store: RaftStore
    private let cache = Mutex<Cache?>(nil)
    private let crls = Mutex<(key: String, made: ContinuousClock.Instant, madeAtMillis: UInt64, pem: String)?>(nil)
    /// How long the ledger's keyring and revocations are trusted before
    /// they are read again: rotation and revocation reach verification on
    /// every node within this (re-reading per request was the largest cost
    /// of verification).
    public static let recheckInterval: Duration = .seconds(1)
    /// How long a CRL is served before it is signed again.
    static let crlLifetime: TimeInterval = 3_600
    static let crlRefresh: Duration = .seconds(600)

    /// The most any identity may live, whatever a token allows.
    public static let ttlMaxSeconds: UInt32 = AuthorityDocuments.identityLifetimeMaxSeconds
    public static let tokenLifetimeMaxSeconds: UInt32 = 7 * 86_400
    /// How long identities from one piece of evidence may be renewed, at most.
    public static let evidenceLifetimeMaxSeconds: UInt32 = 30 * 86_400

    public init(trustDomain: String, keyAlgorithm: KeyAlgorithm = .ecdsaP256, kek: SymmetricKey, store: RaftStore) {
        self.trustDomain = trustDomain
        self.keyAlgorithm = keyAlgorithm
        self.kek = kek
        self.store = store
        issuedLookup = { kind, serial, notAfterMillis, fingerprint in
            guard let document = try? store.document(named: AuthorityDocuments.issued(notAfterMillis: notAfterMillis, serial: serial)),
                  let recorded = IssuedRecord.fingerprint(in: document.content) else { return false }
            return recorded.fingerprint == fingerprint && recorded.kind == (kind == .jwt ? .jwt : .x509)
        }
    }

    /// The log index that wrote an identity's issuance record, if this
    /// node holds it (named by the identity's serial and expiry).
    public func issuedRecordIndex(serial: String, notAfter: Date) -> UInt64? {
        let notAfterMillis = UInt64(max(0, notAfter.timeIntervalSince1970 * 1000))
        return (try? store.document(named: AuthorityDocuments.issued(notAfterMillis: notAfterMillis, serial: serial)))??.logIndex
    }

    /// The issuance record of the identity with `serial` (any case, leading
    /// zeros or not) and the log index that wrote it, if this node holds it:
    /// found by a scan of the records' names (a revocation by serial).
    public func issuedRecord(serial: String) throws -> (record: IssuedRecord, logIndex: UInt64)? {
        let wanted = Revocation.canonicalSerial(serial)
        // Records name serials in lower-case hex: the wanted digits, after zeros.
        guard let name = try store.firstName(under: AuthorityDocuments.issuedPrefix, where: { name in
            guard name.hasSuffix(wanted), let slash = name.lastIndex(of: "/") else { return false }
            return name[name.index(after: slash)...].dropLast(wanted.count).allSatisfy { $0 == "0" }
        }), let document = try store.document(named: name),
              let record = try? JSONDecoder().decode(IssuedRecord.self, from: Data(document.content)) else { return nil }
        return (record, document.logIndex)
    }

    /// A JWT-SVID kept for an idempotency key is a bearer token, and what
    /// is kept goes into the log and the ledger: every node's disk, its
    /// checkpoints, snapshot streams to new members. It is sealed with the
    /// KEK first, as the authorities' keys are (certificates are public
    /// and are kept as they are).
    static let keptMagic = Array("WSA1".utf8)
    static let keptPurpose = "warrant kept jwt-svid"

    /// `token` sealed for keeping (see `keptMagic`).
    public func sealKept(_ token: [UInt8]) throws -> [UInt8] {
        try SealedKey.sealBytes(token, magic: Self.keptMagic, purpose: Self.keptPurpose, with: kek)
    }

    /// A kept JWT-SVID opened: one kept before they were sealed is its own
    /// bytes (a JWT begins `eyJ`, never the magic).
    public func openKept(_ artifact: [UInt8]) throws -> [UInt8] {
        guard artifact.starts(with: Self.keptMagic) else { return artifact }
        guard let token = SealedKey.openBytes(artifact, purpose: Self.keptPurpose, with: kek) else {
            throw AuthorityError("kept_answer_unreadable", "the JWT-SVID kept for this idempotency key cannot be opened with this node's key-encryption key")
        }
        return token
    }

    /// The first 8 bytes of the KEK's SHA-256, hex: names the KEK without revealing it.
    var kekID: String { Hex.encode(kek.withUnsafeBytes { SHA256.hash(data: Array($0)) }.prefix(8)) }

    /// A new authority (X.509 CA and JWT key), private keys sealed.
    public func makeAuthority(_ algorithm: KeyAlgorithm? = nil, state: AuthorityKeyring.Entry.State, now: Date = Date()) throws -> AuthorityKeyring.Entry {
        let algorithm = algorithm ?? keyAlgorithm
        let x509 = try X509Authority.create(trustDomain: trustDomain, algorithm: algorithm, now: now)
        let jwt = try JWTAuthority.create(trustDomain: trustDomain, algorithm: algorithm)
        return AuthorityKeyring.Entry(
            id: String(Hex.encode(x509.certificate.serialNumber.bytes).prefix(16)), state: state, algorithm: algorithm.rawValue,
            x509Certificate: try x509.certificate.serializeAsPEM().pemString,
            x509Key: try SealedKey.seal(x509.privateKeyPEM, purpose: "warrant trust domain x509 key", with: kek),
            jwtKeyID: jwt.keyID, jwtKey: try SealedKey.seal(jwt.privateKeyPEM, purpose: "warrant trust domain jwt key", with: kek),
            createdAtMillis: UInt64(now.timeIntervalSince1970 * 1000))
    }

    /// The first keyring of the trust domain: one active authority.
    public func makeKeyring() throws -> [UInt8] {
        let keyring = AuthorityKeyring(trustDomain: trustDomain, kekID: kekID, authorities: [try makeAuthority(state: .active)])
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try encoder.encode(keyring))
    }

    /// The keyring as the ledger has it now (uncached).
    public func keyring() throws -> AuthorityKeyring? {
        guard let document = try store.document(named: AuthorityDocuments.keyring) else { return nil }
        return try JSONDecoder().decode(AuthorityKeyring.self, from: Data(document.content))
    }

    /// Forgets the cached keys, so the next call reads the ledger.
    public func invalidate() {
        cache.withLock { $0?.checked = .now - .seconds(3_600) }
    }

    /// The keys in the ledger, unsealed (cached; see `recheckInterval`);
    /// nil before the first leader made them.
    ///
    /// `maxAge` shortens the wait: a verification that fails for want of a
    /// key asks again with a tenth of a second, so a rotation a moment ago
    /// is seen without letting bad requests re-read the ledger each time.
    public func keys(maxAge: Duration = AuthorityService.recheckInterval) throws -> Keys? {
        let nowMillis = UInt64(Date().timeIntervalSince1970 * 1000)
        if let cached = cache.withLock({ $0 }), cached.checked.duration(to: .now) < maxAge, nowMillis < cached.nextDropMillis {
            return cached.keys
        }
        guard let document = try store.document(named: AuthorityDocuments.keyring) else { return nil }
        let revocationsDocument = try store.document(named: AuthorityDocuments.revocations)
        let revocationsVersion = revocationsDocument?.version ?? 0
        let previous = cache.withLock { $0 }
        if let previous, previous.keyringVersion == document.version, previous.revocationsVersion == revocationsVersion,
           nowMillis < previous.nextDropMillis {
            cache.withLock { $0?.checked = .now }
            return previous.keys
        }
        let keyring = try JSONDecoder().decode(AuthorityKeyring.self, from: Data(document.content))
        guard keyring.kekID == kekID else {
            throw AuthorityError("wrong_kek", "the keyring was sealed with key-encryption key \(keyring.kekID), not this node's \(kekID)")
        }
        var unsealed = previous?.unsealed ?? [:]
        var published: [Authority] = []
        for entry in keyring.authorities where entry.isPublished(at: nowMillis) {
            if let known = unsealed[entry.id], known.entry == entry {
                published.append(known)
                continue
            }
            let authority = try unseal(entry, trustDomain: keyring.trustDomain)
            unsealed[entry.id] = authority
            published.append(authority)
        }
        guard let active = published.first(where: { $0.entry.state == .active }) else {
            throw AuthorityError("no_active_authority", "the keyring has no active authority")
        }
        // At most 7 (a keyring holds at most 8 authorities, one active): the
        // version's part of the sequence is never reached, and the sequence
        // never goes down for a newer keyring (agents keep the highest).
        let dropped = min(15, keyring.authorities.count - published.count)
        let bundle = TrustBundle(trustDomain: keyring.trustDomain, x509Authorities: published.map(\.x509.certificate),
                                 jwtKeys: Dictionary(published.map { ($0.jwt.keyID, $0.jwt.publicKey) }, uniquingKeysWith: { a, _ in a }),
                                 sequence: document.version * 16 + UInt64(dropped))
        // An unreadable list fails closed: no keys, so nothing verifies or issues.
        let revocations = try revocationsDocument.map { try JSONDecoder().decode(RevocationList.self, from: Data($0.content)) } ?? RevocationList()
        let keys = Keys(active: active, published: published, bundle: bundle, bundlePEM: try bundle.pem(), revocations: revocations,
                        keyringVersion: document.version, revocationsVersion: revocationsVersion)
        let nextDrop = published.compactMap { $0.entry.state == .retired ? $0.entry.keepUntilMillis : nil }.min() ?? .max
        cache.withLock {
            $0 = Cache(keyringVersion: document.version, revocationsVersion: revocationsVersion, keys: keys, checked: .now,
                       nextDropMillis: nextDrop, unsealed: unsealed.filter { id, _ in published.contains { $0.id == id } })
        }
        return keys
    }

    private func unseal(_ entry: AuthorityKeyring.Entry, trustDomain: String) throws -> Authority {
        let certificate = try Certificate(pemEncoded: entry.x509Certificate)
        let x509Key = try SealedKey.open(entry.x509Key, purpose: "warrant trust domain x509 key", with: kek, path: AuthorityDocuments.keyring)
        let jwtKey = try SealedKey.open(entry.jwtKey, purpose: "warrant trust domain jwt key", with: kek, path: AuthorityDocuments.keyring)
        let x509 = try X509Authority(trustDomain: trustDomain, certificate: certificate, privateKey: try SigningKey(pemRepresentation: x509Key))
        let jwt = JWTAuthority(trustDomain: trustDomain, key: try SigningKey(pemRepresentation: jwtKey))
        return Authority(entry: entry, x509: x509, jwt: jwt)
    }

    /// The join token a secret names, as the ledger has it now.
    public func token(secret: String) throws -> (hash: String, token: JoinToken?) {
        let hash = Self.hash(secret)
        guard let document = try store.document(named: AuthorityDocuments.token(hash)) else { return (hash, nil) }
        return (hash, JoinToken(canonical: document.content))
    }

    /// The answer already recorded for an idempotency key, if any.
    public func earlierAnswer(idempotencyKey: String) throws -> IdempotentAnswer? {
        guard let document = try store.document(named: AuthorityDocuments.idempotency(Self.hash(idempotencyKey))) else { return nil }
        return try? JSONDecoder().decode(IdempotentAnswer.self, from: Data(document.content))
    }

    /// The CRLs of every published authority, PEM, one after another (what
    /// `openssl verify -crl_check -CRLfile` reads). Each lists the X.509
    /// identities that authority issued that a rule revokes and that have
    /// not expired. Signed again when the rules or authorities change, and
    /// every `crlRefresh`.
    public func crlPEM() throws -> String {
        guard let keys = try keys() else { throw AuthorityError("no_authority", "the trust domain's keys are not made yet") }
        let key = "\(keys.bundle.sequence)/\(keys.revocations.rules.count)/\(keys.revocations.rules.last?.revokedAtMillis ?? 0)"
        // Also signed again once more after a rule's first seconds, for
        // rules kept without their log index (older ones), which go by the
        // times: an identity signed just before such a rule but applied
        // just after it is covered by it and must reach the CRL too. (An
        // indexed rule covers what was recorded before it, all applied here
        // by the time the rule is.)
        let settled = (keys.revocations.rules.map(\.revokedAtMillis).max() ?? 0) + 5_000
        // (At most once a second meanwhile.)
        if let cached = crls.withLock({ $0 }), cached.key == key, cached.made.duration(to: .now) < Self.crlRefresh,
           cached.madeAtMillis > settled || cached.made.duration(to: .now) < .seconds(1) {
            return cached.pem
        }
        var revoked: [String: [(serial: [UInt8], at: Date)]] = [:]
        if !keys.revocations.rules.isEmpty {
            try store.forEachDocumentInChunks(prefix: AuthorityDocuments.issuedPrefix) { document in
                guard let record = try? JSONDecoder().decode(IssuedRecord.self, from: Data(document.content)), record.kind == .x509,
                      let rule = keys.revocations.revoking(serial: record.serial, spiffeID: record.spiffeID, attributes: record.attributes,
                                                           issuedAtMillis: record.issuedAtMillis, recordIndex: { document.logIndex }),
                      let serial = Hex.decode(record.serial) else { return }
                revoked[record.authority, default: []].append((serial, Date(timeIntervalSince1970: TimeInterval(rule.revokedAtMillis) / 1000)))
            }
        }
        let now = Date()
        var pem = ""
        for authority in keys.published {
            let number = Self.crlNumber(contentVersion: keys.keyringVersion &+ keys.revocationsVersion, now: now)
            let der = try authority.x509.crl(revoked: revoked[authority.id] ?? [], number: number, now: now,
                                             nextUpdate: now.addingTimeInterval(Self.crlLifetime))
            pem += PEMDocument(type: "X509 CRL", derBytes: der).pemString + "\n"
        }
        crls.withLock { $0 = (key, .now, UInt64(now.timeIntervalSince1970 * 1000), pem) }
        return pem
    }

    /// A CRL's number (16 bytes): first what it was made from, the
    /// keyring's and revocation list's versions (the same on every node
    /// once applied, and growing with every change), then the time in
    /// seconds. A CRL with a new rule outnumbers every CRL made before the
    /// rule, on any node, whatever their clocks; CRLs of the same content
    /// are ordered by when they were signed.
    static func crlNumber(contentVersion: UInt64, now: Date) -> [UInt8] {
        withUnsafeBytes(of: contentVersion.bigEndian) { Array($0) }
            + withUnsafeBytes(of: UInt64(max(0, now.timeIntervalSince1970)).bigEndian) { Array($0) }
    }

    /// The issuance records this node holds, as verifiers consult them
    /// before checking a signature: the record named by the serial and
    /// expiry must carry the same kind and SHA-256. The ledger is in
    /// memory: one map read and a parse of one small record.
    public let issuedLookup: IssuedLookup

    /// SHA-256, lower-case hex.
    public static func hash(_ text: String) -> String {
        Hex.encode(UTF8Text.withBytes(of: text) { SHA256.digest(UnsafeRawBufferPointer($0)) })
    }

    public static func hash(_ bytes: [UInt8]) -> String { Hex.encode(SHA256.digest(bytes)) }

    /// A new join token secret: "wjt." and 32 random bytes in base64url.
    public static func newTokenSecret() -> String {
        "wjt." + Base64URL.encode((0..<32).map { _ in UInt8.random(in: 0...255) })
    }
}
