from ddimctl import main

main()
