// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "qbackup",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "qbackup", targets: ["qbackup"]),
        .library(name: "QCowImage", targets: ["QCowImage"]),
        .library(name: "BitmapStore", targets: ["BitmapStore"]),
        .library(name: "BackupChain", targets: ["BackupChain"]),
        // Hostile-input entry points, for the libFuzzer executables in Fuzz/ (not API).
        .library(name: "FuzzTargets", targets: ["FuzzTargets"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", exact: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", exact: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log", exact: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto", exact: "4.5.2"),
    ],
    targets: [
        .systemLibrary(name: "CZlib", path: "Sources/CZlib", pkgConfig: "zlib",
                       providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd", pkgConfig: "libzstd",
                       providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CLZ4", path: "Sources/CLZ4", pkgConfig: "liblz4",
                       providers: [.apt(["liblz4-dev"])]),
        // libnbd's header only (no pkgConfig, no link): LiveSource dlopens libnbd.so.0.
        .systemLibrary(name: "CNBD", path: "Sources/CNBD", providers: [.apt(["libnbd-dev"])]),
        // libvirt's headers only, likewise: LiveSource dlopens libvirt.so.0 for --libvirt.
        .systemLibrary(name: "CLibvirt", path: "Sources/CLibvirt", providers: [.apt(["libvirt-dev"])]),
        .target(
            name: "QCowImage",
            dependencies: [
                "CZlib", "CZstd", "CLZ4",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(name: "BitmapStore", dependencies: ["QCowImage"]),
        .target(
            name: "BackupChain",
            dependencies: [
                "QCowImage", "BitmapStore", "CZlib", "CLZ4",
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .target(
            name: "LiveSource",
            dependencies: [
                "QCowImage", "BitmapStore", "BackupChain", "CNBD", "CLibvirt",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "qbackup",
            dependencies: [
                "QCowImage", "BitmapStore", "BackupChain", "LiveSource",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            plugins: ["BuildInfo"]
        ),
        // Commit and build date for `qbackup --version` (scripts/build-info.sh, run on every build).
        .plugin(name: "BuildInfo", capability: .buildTool()),
        .target(name: "TestSupport", dependencies: ["QCowImage", "LiveSource"], path: "Tests/TestSupport"),
        .testTarget(name: "QCowImageTests", dependencies: ["QCowImage", "TestSupport"]),
        .testTarget(name: "BitmapStoreTests", dependencies: ["BitmapStore", "TestSupport"]),
        .testTarget(name: "BackupChainTests", dependencies: ["BackupChain", "TestSupport", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "CLITests", dependencies: ["TestSupport"]),
        .testTarget(name: "LiveSourceTests", dependencies: ["LiveSource", "BackupChain", "TestSupport"]),
        .target(name: "FuzzTargets", dependencies: ["QCowImage", "BitmapStore", "BackupChain"], path: "Tests/FuzzTargets"),
        .testTarget(name: "FuzzRegressionTests", dependencies: ["FuzzTargets", "TestSupport", "BackupChain", "QCowImage"]),
    ],
    swiftLanguageModes: [.v6]
)
